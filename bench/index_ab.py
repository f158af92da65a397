"""Same-run A/B of the search stack against another commit: one bundle, the same queries, both trees.

A bundle of ``--size`` synthetic codes (index/synthetic_codes.py: 8192 latents, skewed firing rates) is built
once; then, round after round, a child process per tree (``--base`` checked out into a temp folder with
``git worktree``, and this checkout) opens it with ``index.Searcher`` through a model of the bundle's shape
and times the same distinct queries through the public search call: one at a time (p50 / p99 latency) and
as one batch, on the exact sparse path and the approximate one. The variants alternate, medians over rounds
are reported, and every hit list of the two trees is compared (ids and scores): a faster path that answers
differently is not a result.

    python bench/index_ab.py --base 69b3aa5 --size 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N_LATENTS = 8192
PATHS = (("sparse", {}), ("approx", {"budget": 0.3}))

CHILD = r"""
import json, sys, time
import numpy as np, torch
from sparc_core import SparcConfig, SparcModel, SparseCode
from index import Searcher
bundle, queries, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
paths = json.loads(sys.argv[4])
model = SparcModel(SparcConfig(streams={"codes": 8, "other": 8}, n_latents=8192, k=k))
s = Searcher(bundle, model=model)
z = np.load(queries)
qi, qv = torch.from_numpy(z["qi"].astype(np.int64)), torch.from_numpy(z["qv"].astype(np.float32))
out = {}
for name, kw in paths:
    code = SparseCode(qi, qv, 8192)
    for q in range(min(20, len(qi))):  # warm: page in the lists the queries touch
        s.search(SparseCode(qi[q:q + 1], qv[q:q + 1], 8192), top_k=10, path=name, **kw)
    lat = []
    for q in range(len(qi)):
        one = SparseCode(qi[q:q + 1], qv[q:q + 1], 8192)
        t0 = time.perf_counter()
        s.search(one, top_k=10, path=name, **kw)
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    res = s.search(code, top_k=10, path=name, **kw)
    batch = time.perf_counter() - t0
    out[name] = {"lat": lat, "batch": batch, "ids": res.ids, "scores": res.scores}
print("RESULT " + json.dumps(out))
"""


def run_child(tree: Path, bundle: Path, queries: Path, k: int) -> dict:
    env = os.environ | {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(queries), str(k), json.dumps(PATHS)],
        env=env, cwd=tree, capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"child in {tree} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.split("RESULT ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare with (e.g. the one before a refactor)")
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--l0", type=int, default=64, help="active latents per item (and code width k)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from index.bundle import build_bundle_from_codes
    from index.synthetic_codes import code_chunks, latent_probabilities, sample_codes

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "index", "sparc_core"], cwd=ROOT, capture_output=True, text=True)
    label = head + ("+changes" if dirty.stdout.strip() else "")
    with tempfile.TemporaryDirectory(prefix="sparc-ab-") as d:
        work = Path(d)
        base_tree = work / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            p = latent_probabilities(N_LATENTS, 1.0)
            t0 = time.perf_counter()
            build_bundle_from_codes(work / "bundle", code_chunks(args.size, args.l0, p, seed=1), args.size, args.l0,
                                    N_LATENTS, stream="codes", progress=True)  # fmt: skip
            print(f"built {args.size:,} items (L0 {args.l0}) in {time.perf_counter() - t0:.1f} s", flush=True)
            qi, qv = sample_codes(args.queries, args.l0, p, seed=123)
            np.savez(work / "queries.npz", qi=qi, qv=qv)
            variants = {f"base {args.base}": base_tree, f"this {label}": ROOT}
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who goes first
                for v in order:
                    runs[v].append(run_child(variants[v], work / "bundle", work / "queries.npz", args.l0))
                print(f"round {r + 1}/{args.rounds} done", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)

    names = list(variants)
    print(f"\n{args.size:,} items, L0 {args.l0}, {args.queries} distinct queries, {args.rounds} rounds alternating "
          f"(medians), {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| path | tree | single p50 (ms) | single p99 (ms) | batch of all (ms) | identical hits |")
    print("|---|---|---|---|---|---|")
    for path, _ in PATHS:
        first = runs[names[0]][0][path]
        med = {}
        for v in names:
            lat = np.array([run[path]["lat"] for run in runs[v]])  # [rounds, queries]
            p50 = float(np.median(np.percentile(lat, 50, axis=1))) * 1e3
            p99 = float(np.median(np.percentile(lat, 99, axis=1))) * 1e3
            batch = float(np.median([run[path]["batch"] for run in runs[v]])) * 1e3
            med[v] = (p50, batch)
            same = all(run[path]["ids"] == first["ids"] and run[path]["scores"] == first["scores"] for run in runs[v])
            print(f"| {path} | {v} | {p50:.3f} | {p99:.3f} | {batch:.1f} | {'yes' if same else 'NO'} |")
        (b50, bb), (t50, tb) = med[names[0]], med[names[1]]
        print(f"| {path} | this / base | {t50 / b50:.3f} | | {tb / bb:.3f} | |")


if __name__ == "__main__":
    main()
