"""Load benchmark of the gRPC service on loopback: N concurrent clients for a bounded time.

A 100k-item DINO bundle is built from the world of bench/index_search.py (codes as dense as real ones;
its checkpoint comes from `python bench/index_search.py --train runs/bench-index`), a server runs in its
own process (`sparc serve`),
and client processes send CLIP-text vector queries through SearchBatch or SearchStream for each search
path. Reported per row: queries/s, per-call p50/p99 latency, the in-process search time of the same
batch (the RPC overhead is the difference) and the server's RSS at start and end of the run.

    python bench/service_load.py --checkpoint runs/bench-index --items 100000 --clients 2 --batch 6 --soak 120

With ``--base REV`` it is a same-run A/B instead: the server of commit REV (checked out with ``git worktree``)
and this checkout's serve the same bundle in turn, round after round (``--rounds``, variants alternating),
and the table gives each tree's median queries/s and per-call p50 / p99 with the ratios; both servers answer
the same distinct queries first and their hit lists (ids and scores) are compared.

    python bench/service_load.py --base 9e01049 --seconds 10 --rounds 3 [--explain]

``--explain``: every query asks for its hits' explanations (compared too in the A/B).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _requests(queries: np.ndarray, path: str, explain: bool) -> list:
    from service.client import make_query, search_request

    return [
        search_request(make_query(stream="clip_txt", vector=q), ["bench"], top_k=10, path=path, explain=explain) for q in queries
    ]


def _client(
    target: str, queries: np.ndarray, mode: str, path: str, batch: int, seconds: float, explain: bool, out: mp.Queue
) -> None:
    from service.client import SparcClient

    reqs = _requests(queries, path, explain)
    lat, n = [], 0
    with SparcClient(target) as c:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            chunk = [reqs[(i + j) % len(reqs)] for j in range(batch)]
            i += batch
            t0 = time.perf_counter()
            if mode == "batch":
                c.search_batch(chunk, timeout=30)
            else:
                for _ in c.search_stream(chunk, timeout=30):
                    pass
            lat.append(time.perf_counter() - t0)
            n += batch
    out.put((n, lat))


def _serve(tree: Path, checkpoint: str, bundle: Path) -> tuple[subprocess.Popen, str]:
    """``sparc serve`` of the source tree ``tree`` over one bundle; (process, address) once it is ready."""
    from service.client import SparcClient

    port = _free_port()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "sparc_core.cli", "serve", "--checkpoint", str(Path(checkpoint).resolve()),
           "--index", f"bench={bundle}", "--port", str(port), "--metrics-port", "0", "--log-level", "WARNING"]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    try:
        with SparcClient(target) as c:
            c.wait_ready(120)
    except BaseException:
        server.terminate()
        raise
    return server, target


def _load_row(target: str, xq: np.ndarray, mode: str, path: str, args: argparse.Namespace) -> tuple[float, np.ndarray]:
    """(queries/s, per-call latencies in ms) of ``args.clients`` client processes for ``args.seconds``."""
    q: mp.Queue = mp.Queue()
    procs = [
        mp.Process(target=_client, args=(target, xq, mode, path, args.batch, args.seconds, args.explain, q))
        for _ in range(args.clients)
    ]
    t_start = time.perf_counter()
    for pr in procs:
        pr.start()
    results = [q.get() for _ in procs]
    for pr in procs:
        pr.join()
    wall = time.perf_counter() - t_start
    return sum(r[0] for r in results) / wall, np.concatenate([r[1] for r in results]) * 1e3


def _answers(target: str, xq: np.ndarray, path: str, explain: bool) -> list[tuple[list, list, list]]:
    """Each query's hits: ids, scores and (with ``explain``) each hit's shared latents and contributions."""
    from service.client import SparcClient

    with SparcClient(target) as c:
        replies = c.search_batch(_requests(xq, path, explain), timeout=60)
        return [
            (
                [h.id for h in r.hits],
                [round(h.score, 5) for h in r.hits],
                [[(e.latent, round(e.contribution, 5)) for e in h.explanation] for h in r.hits],
            )  # fmt: skip
            for r in replies
        ]


def ab(args: argparse.Namespace, work: Path, xq: np.ndarray) -> None:
    """The same-run A/B of ``--base`` against this checkout (see the module docstring)."""
    base_tree = work / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    trees = {f"base {args.base}": base_tree, "this": ROOT}
    rows = [(m, p) for p in args.paths.split(",") for m in args.modes.split(",")]
    got: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    same = {}
    try:
        for r in range(args.rounds):
            for name, tree in trees.items() if r % 2 == 0 else reversed(list(trees.items())):
                server, target = _serve(tree, args.checkpoint, work / "bundle")
                try:
                    if r == 0:
                        for p in args.paths.split(","):
                            same.setdefault(p, []).append(_answers(target, xq[: args.check_queries], p, args.explain))
                    for mode, path in rows:
                        qps, lat = _load_row(target, xq, mode, path, args)
                        got.setdefault((name, mode, path), []).append((qps, np.percentile(lat, 50), np.percentile(lat, 99)))
                finally:
                    server.terminate()
                    server.wait(timeout=30)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    print(f"\n{args.items} items, {args.clients} client processes, {args.batch} queries per call"
          f"{', explained hits' if args.explain else ''}, {args.seconds:.0f} s "
          f"per row, {args.rounds} rounds alternating (medians), {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| mode | path | tree | queries/s | p50 ms/call | p99 ms/call | identical hits |")
    print("|---|---|---|---|---|---|---|")
    (bname, _), (tname, _) = trees.items()
    for mode, path in rows:
        med = {n: np.median(np.array(got[(n, mode, path)]), axis=0) for n in (bname, tname)}
        equal = "yes" if same[path][0] == same[path][1] else "NO"
        for n in (bname, tname):
            print(f"| {mode} | {path} | {n} | {med[n][0]:.0f} | {med[n][1]:.1f} | {med[n][2]:.1f} | {equal} |")
        ratio = med[tname] / med[bname]
        print(f"| {mode} | {path} | this / base | {ratio[0]:.3f} | {ratio[1]:.3f} | {ratio[2]:.3f} | |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/bench-index", help="trained by bench/index_search.py --train")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--batch", type=int, default=6, help="queries per SearchBatch call / per stream burst")
    p.add_argument("--seconds", type=float, default=20.0, help="per row")
    p.add_argument("--paths", default="sparse,dense")
    p.add_argument("--modes", default="batch,stream")
    p.add_argument("--soak", type=float, default=0.0, help="extra seconds of SearchBatch load to watch memory")
    p.add_argument("--base", help="a commit to compare with, same run (see above)")
    p.add_argument("--rounds", type=int, default=3, help="with --base: rounds, the trees alternating")
    p.add_argument("--explain", action="store_true", help="every query asks for its hits' explanations")
    p.add_argument("--check-queries", type=int, default=64, help="with --base: distinct queries whose hits are compared")
    args = p.parse_args()

    from index import Searcher, build_bundle
    from sparc_core.worlds.synthetic import index_gallery as synth_gallery

    work = Path(tempfile.mkdtemp(prefix="sparc-load-"))
    gal, _, xq = synth_gallery(args.items, work)
    build_bundle(args.checkpoint, "dino", gal, work / "bundle", progress=False)
    if args.base:
        try:
            ab(args, work, xq)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    searcher = Searcher(work / "bundle")
    server, target = _serve(ROOT, args.checkpoint, work / "bundle")
    try:
        code = searcher.encode("clip_txt", xq[: args.batch])
        print(
            f"{args.items} items, {args.clients} client processes, {args.batch} queries per call"
            f"{', explained hits' if args.explain else ''}, {args.seconds:.0f} s per row, server pid {server.pid}"
        )
        print("mode | path | qps | p50_ms/call | p99_ms/call | in-process_ms/call | server_rss_MB start->end")
        print("--- | --- | --- | --- | --- | --- | ---")
        for path in args.paths.split(","):
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                searcher.search(code, top_k=10, path=path)
            inproc = (time.perf_counter() - t0) / reps * 1e3
            for mode in args.modes.split(","):
                rss0 = _rss_mb(server.pid)
                qps, lat = _load_row(target, xq, mode, path, args)
                print(
                    f"{mode} | {path} | {qps:.0f} | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} | "
                    f"{inproc:.1f} | {rss0:.0f}->{_rss_mb(server.pid):.0f}",
                    flush=True,
                )
        if args.soak:
            rss = [_rss_mb(server.pid)]
            q = mp.Queue()
            procs = [
                mp.Process(target=_client, args=(target, xq, "batch", "sparse", args.batch, args.soak, args.explain, q))
                for _ in range(args.clients)
            ]
            for pr in procs:
                pr.start()
            end = time.monotonic() + args.soak
            while time.monotonic() < end:
                time.sleep(min(10, args.soak / 6))
                rss.append(_rss_mb(server.pid))
            results = [q.get() for _ in procs]
            for pr in procs:
                pr.join()
            print(
                f"soak {args.soak:.0f} s: {sum(r[0] for r in results)} queries; server RSS MB every ~10 s: "
                + ", ".join(f"{x:.0f}" for x in rss)
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
