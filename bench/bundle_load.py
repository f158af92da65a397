"""What opening a bundle costs with and without its validation (index/validate.py), on a 1M-item bundle.

The bundle is built once from synthetic skewed codes (index/synthetic_codes.py, int ids, then a string-id copy
of the same codes). Each variant opens it in a fresh child process (cold: nothing of it in this process;
warm: the page cache holds the files, as on a server that restarts), alternating over rounds; medians.

- ``none``: files' sizes only (what opening did before validation);
- ``structure``: + latent ids, values, posting rows, id index (what the kernels rely on);
- ``full``: + every file's CRC-32 (the default).

    python bench/bundle_load.py --n 1000000 --l0 64
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from index.bundle import build_bundle_from_codes
from index.synthetic_codes import code_chunks, latent_probabilities

CHILD = """
import sys, time
from index import reader, validate
mode = {mode!r}
if mode == "structure":  # sizes and structure, no checksums
    reader.verify_files = lambda vdir, files, sums: validate.verify_files(vdir, files, {{}})
t = time.perf_counter()
reader.Bundle({path!r}, verify=mode != "none")
print(time.perf_counter() - t)
"""


def open_seconds(path: Path, mode: str) -> float:
    code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), mode=mode, path=str(path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--l0", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sparc-load-"))
    p = latent_probabilities(8192, 1.0, seed=0)
    built = {}
    for kind in ("int", "str"):
        out = work / f"bundle-{kind}"
        if not (out / "CURRENT").exists():
            ids = None if kind == "int" else np.array([f"img/{i:09d}.jpg" for i in range(args.n)])
            t = time.perf_counter()
            build_bundle_from_codes(out, code_chunks(args.n, args.l0, p, seed=1), args.n, args.l0, 8192, ids=ids)
            built[kind] = time.perf_counter() - t
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        took = f", built in {built[kind]:.1f} s" if kind in built else ""
        print(f"{kind} ids: {args.n:,} items, {size / 2**20:.0f} MiB on disk{took}")
    print(f"\nopening a {args.n:,}-item bundle (median of {args.rounds} rounds, variants alternating, page cache warm)")
    print(f"{'ids':<5}{'none (s)':>10}{'structure (s)':>15}{'full (s)':>10}{'full / none':>13}")
    for kind in ("int", "str"):
        path = work / f"bundle-{kind}"
        open_seconds(path, "full")  # the page cache holds the files from here on
        times: dict[str, list[float]] = {"none": [], "structure": [], "full": []}
        for _ in range(args.rounds):
            for mode in times:
                times[mode].append(open_seconds(path, mode))
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"{kind:<5}{med['none']:>10.3f}{med['structure']:>15.3f}{med['full']:>10.3f}{med['full'] / med['none']:>12.1f}x")
    print(f"\nbundles kept in {work} (--work {work} reuses them)")


if __name__ == "__main__":
    main()
