"""Batch jobs on Ray against the local engine, on this machine: feature extraction of rendered scenes and an
index build of synthetic features, each run as the user runs it (``sparc extract`` / ``sparc index build``
in a fresh process), timed, with the peak memory of the driver and of every Ray worker, and the outputs
compared (extraction: the same ids and features; index: the same exact top-10 for 200 random queries).

A machine with 2 cores shows the engine's overhead, not a speed-up: the projection printed at the end is
arithmetic from the measured per-actor rate, labelled as such.

    python bench/cluster.py [--work runs/cluster] [--scenes 20000] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from index import Searcher, read_manifest
from sparc_core import SparcConfig, SparcModel, save_checkpoint
from sparc_core.worlds.scenes import write_scenes
from sparc_core.worlds.towers import extract_flags, read_towers

ROOT = Path(__file__).resolve().parents[1]
TOWERS = ROOT / "bench" / "towers" / "shapes"


def _peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class WorkerMemory(threading.Thread):
    """Samples the peak RSS (VmHWM) of every Ray worker process whose title names ``actor``."""

    def __init__(self, actor: str) -> None:
        super().__init__(daemon=True)
        self.actor, self.peaks, self.stop = actor.encode(), {}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for p in Path("/proc").iterdir():
                if not p.name.isdigit():
                    continue
                try:
                    cmd = (p / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"ray::" in cmd and self.actor in cmd:
                    self.peaks[int(p.name)] = max(self.peaks.get(int(p.name), 0), _peak_kib(int(p.name)))
            time.sleep(0.2)


def run(argv: list[str], actor: str) -> dict[str, float]:
    """One ``sparc`` command in a fresh process: wall time, the driver's peak RSS, the workers' peaks."""
    mem = WorkerMemory(actor)
    mem.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sparc_core.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    mem.stop.set()
    mem.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: sparc {' '.join(argv)}\n{out}")
    peaks = list(mem.peaks.values())
    return {
        "wall": wall, "driver_mib": usage.ru_maxrss / 1024, "workers": len(peaks),
        "worker_max_mib": max(peaks, default=0) / 1024, "worker_sum_mib": sum(peaks) / 1024,
    }  # fmt: skip


def table(title: str, rows: list[tuple[str, int, dict[str, float], str]], base: float) -> None:
    print(f"\n{title}\n")
    print("| engine | rows | wall s | rows/s | vs local | driver peak RSS MiB | workers (peak RSS MiB, max / sum) | output |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, r, same in rows:
        workers = f"{r['workers']} ({r['worker_max_mib']:.0f} / {r['worker_sum_mib']:.0f})" if r["workers"] else "–"
        print(f"| {name} | {n:,} | {r['wall']:.1f} | {n / r['wall']:,.0f} | {base / r['wall']:.2f}x | "
              f"{r['driver_mib']:.0f} | {workers} | {same} |")  # fmt: skip


def bench_extract(work: Path, n_scenes: int, actors: int) -> float:
    scenes = work / f"scenes-{n_scenes}"
    if not (scenes / "captions.csv").is_file():
        write_scenes(scenes, n_scenes, seed=7, overwrite=True, progress=False)
    report = read_towers(TOWERS)
    common = ["extract", "--images", str(scenes / "images"), "--captions", str(scenes / "captions.csv"),
              *extract_flags(report), "--device", "cpu", "--batch-size", "64", "--chunk-size", "1024",
              "--workers", "0", "--quiet"]  # fmt: skip
    runs = {}
    for engine in ("local", "ray"):
        out = work / f"features-{engine}"
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--engine", "ray", "--actors", str(actors), "--num-cpus", str(actors)] if engine == "ray" else []
        runs[engine] = run([*common, "--out", str(out), *extra], "ChunkWorker")
    a, b = work / "features-local", work / "features-ray"
    same_ids = (a / "ids.txt").read_text() == (b / "ids.txt").read_text()
    diffs = {s: float(np.abs(np.load(a / f"{s}.npy") - np.load(b / f"{s}.npy")).max()) for s in ("dino", "clip_img", "clip_txt")}
    rows = len((a / "ids.txt").read_text().splitlines())
    same = f"ids {'equal' if same_ids else 'DIFFER'}, max |diff| {max(diffs.values()):.1e}"
    table(f"Extraction: {n_scenes:,} rendered scenes, the committed shapes towers, CPU, batch 64, chunks of 1,024",
          [("local (one process)", rows, runs["local"], "reference"), (f"ray, {actors} actors", rows, runs["ray"], same)],
          runs["local"]["wall"])  # fmt: skip
    eng = json.loads((b / "extract.json").read_text())["engine"]
    return eng["rows_encoded"] / eng["actor_seconds"]  # rows per second of actor time, start-up excluded


def bench_index(work: Path, n_rows: int, actors: int) -> float:
    d = work / "index"
    d.mkdir(parents=True, exist_ok=True)
    ckpt, feats = d / "ckpt", d / f"g-{n_rows}.npy"
    if not (ckpt / "CURRENT").is_file():
        save_checkpoint(SparcModel(SparcConfig(streams={"img": 256, "txt": 128}, n_latents=4096, k=32), seed=0), ckpt)
    if not feats.is_file():
        arr = np.lib.format.open_memmap(feats, mode="w+", dtype=np.float32, shape=(n_rows, 256))
        rng = np.random.default_rng(0)
        for a in range(0, n_rows, 100_000):
            arr[a : a + 100_000] = rng.standard_normal((min(100_000, n_rows - a), 256), dtype=np.float32)
        arr.flush()
        del arr
    common = ["index", "build", "--checkpoint", str(ckpt), "--stream", "img", "--features", str(feats), "--no-dense", "--quiet"]
    variants = [
        ("local, one bundle", ["--out", str(d / "single")]),
        (f"ray, {actors} actors, {actors} shards", ["--out", str(d / "ray"), "--engine", "ray", "--actors", str(actors),
                                                     "--num-cpus", str(actors)]),
    ]  # fmt: skip
    runs, shards = {}, {}
    for name, extra in variants:
        shutil.rmtree(d / ("single" if "local" in name else "ray"), ignore_errors=True)
        runs[name] = run([*common, *extra], "ShardWorker")
    shards = sorted((d / "ray").glob("shard-*"))
    xq = np.random.default_rng(1).standard_normal((200, 128)).astype(np.float32)  # 200 distinct queries
    a = Searcher(d / "single").search(("txt", xq), top_k=10, path="sparse")
    b = Searcher(shards).search(("txt", xq), top_k=10, path="sparse")
    same_hits = sum(x == y for x, y in zip(a.ids, b.ids))
    max_diff = float(np.abs(np.array(a.scores) - np.array(b.scores)).max())
    same = f"top-10 identical for {same_hits}/200 queries, max |score diff| {max_diff:.1e}"
    names = [n for n, _ in variants]
    table(f"Index build: {n_rows:,} synthetic 256-d rows, 4,096 latents, k 32, sparse path only (--no-dense)",
          [(names[0], n_rows, runs[names[0]], "reference"), (names[1], n_rows, runs[names[1]], same)],
          runs[names[0]]["wall"])  # fmt: skip
    built = [read_manifest(p) for p in shards]
    return sum(m.n_items for m in built) / sum(m.build_seconds for m in built)  # per actor, start-up excluded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/cluster")
    ap.add_argument("--scenes", type=int, default=20_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--actors", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; Ray {__import__('ray').__version__}; every command in a fresh process")
    per_actor = {
        "extraction": bench_extract(work, args.scenes, args.actors),
        "index build": bench_index(work, args.rows, args.actors),
    }
    print("\nProjection (arithmetic, not measured): N actors x one actor's measured rate (rows per second of the time")
    print("actors spent on units: start-up excluded), if reading the inputs keeps up; each actor here had 1 CPU core.")
    print("A GPU actor runs far faster per actor (not measured here).\n")
    print("| job | per actor (rows/s, measured) | 16 actors | 128 actors | 1e9 rows on 128 actors |")
    print("|---|---|---|---|---|")
    for job, r in per_actor.items():
        print(f"| {job} | {r:,.0f} | {16 * r:,.0f} | {128 * r:,.0f} | {1e9 / (128 * r) / 3600:,.1f} h |")
    print(json.dumps({"per_actor_rows_per_s": per_actor}))


if __name__ == "__main__":
    main()
