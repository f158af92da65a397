"""A live index under load: new items, deletes and a checkpoint rollover land in a running ``sparc serve``
while two client processes search at about 70% of its capacity.

Setup: planted-concept data, a model trained here (and a second one for the rollover), a bundle of 90% of
the gallery. The service runs as a real process on a deployment file. Capacity is measured first (two
processes searching as fast as they can for a few seconds); then for ``--seconds`` the clients send
sparse queries at 70% of it, each answer recorded with its latency, the checkpoint that answered and the
version of every hit. Three events, a third of the run apart:

1. ``sparc index add`` of the remaining 10% of the items, then SIGHUP (the new version swapped in);
2. the admin call ``DeleteItems`` of 5% of the items;
3. a rollover: ``sparc deploy`` of the second checkpoint with a bundle rebuilt from it, then SIGHUP.

Printed per second: answered, errors, p50 / p99 latency, the versions answering; then the totals: errors,
answers mixing versions or checkpoints (a hit of a bundle version that does not belong to the answer's
checkpoint, or hits of several versions), p99 in the second after each event against the steady p99, and
the server's RSS in steady state, after each event and at the end.

    python bench/live_index.py [--seconds 60] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from index import build_bundle
from index.manifest import current_version, read_manifest
from sparc_core import TrainConfig, train
from sparc_core.config import SynthConfig
from sparc_core.worlds.synthetic import write_synthetic

SPARC = [sys.executable, "-m", "sparc_core.cli"]
STREAMS = {"dino": 64, "clip_img": 48, "clip_txt": 48}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def setup(work: Path, n: int) -> dict:
    data = work / "data"
    if not (data / "eval" / "dino.npy").exists():
        write_synthetic(SynthConfig(streams=STREAMS, unit_norm=["clip_img", "clip_txt"], n_train=8000, n_eval=n,
                                    n_concepts=64, concepts_per_sample=3.0), data)  # fmt: skip
    ckpts = {}
    for name, seed in (("v1", 0), ("v2", 1)):
        out = work / name / "sparc"
        if not (out / "CURRENT").exists():
            train(TrainConfig(features={s: str(data / "train" / f"{s}.npy") for s in STREAMS}, out=str(out), n_latents=256,
                              k=8, auxk=32, steps=400, batch_size=128, lr=4e-3, val_rows=300, eval_every=400,
                              save_every=400, block_size=1024, progress=False, seed=seed))  # fmt: skip
        ckpts[name] = out
    feats = np.load(data / "eval" / "dino.npy")
    split = int(0.9 * len(feats))
    np.save(work / "first.npy", feats[:split])
    np.save(work / "rest.npy", feats[split:])
    for d in ("v1/images", "v2/images"):
        import shutil

        shutil.rmtree(work / d, ignore_errors=True)
    build_bundle(ckpts["v1"], "dino", work / "first.npy", work / "v1" / "images", progress=False)
    return {"ckpts": ckpts, "split": split, "n": len(feats), "queries": str(data / "eval" / "clip_txt.npy")}


def client(target: str, queries_file: str, rate: float, seconds: float, t0: float, out: str, seed: int) -> None:
    """Search at ``rate`` queries/s (0: as fast as possible) until ``t0 + seconds``; one JSON line per answer."""
    from service.client import SparcClient, make_query, search_request

    queries = np.load(queries_file)
    rng = np.random.default_rng(seed)
    lines = []
    with SparcClient(target, retries=1) as c:
        next_at = time.monotonic()
        while time.monotonic() < t0 + seconds:
            if rate > 0:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += 1.0 / rate
            q = queries[int(rng.integers(len(queries)))]
            t = time.monotonic()
            try:
                r = c.search(search_request(make_query(stream="clip_txt", vector=q), ["images"], top_k=10, path="sparse"),
                             timeout=5)  # fmt: skip
                lines.append({"t": t - t0, "ms": (time.monotonic() - t) * 1e3, "ok": True, "ck": r.checkpoint_sha256[:12],
                              "v": sorted({h.index_version for h in r.hits})})  # fmt: skip
            except Exception as e:  # noqa: BLE001 - every failure is counted
                lines.append({"t": t - t0, "ms": (time.monotonic() - t) * 1e3, "ok": False, "err": type(e).__name__})
    Path(out).write_text("\n".join(json.dumps(x) for x in lines))


def run_clients(target: str, queries: str, rate: float, seconds: float, work: Path, tag: str) -> list[mp.Process]:
    t0 = time.monotonic()
    procs = []
    for i in range(2):
        p = mp.get_context("spawn").Process(
            target=client, args=(target, queries, rate, seconds, t0, str(work / f"{tag}-{i}.jsonl"), i)
        )
        p.start()
        procs.append(p)
    return procs


def read_answers(work: Path, tag: str) -> list[dict]:
    out = []
    for f in sorted(work.glob(f"{tag}-*.jsonl")):
        out += [json.loads(x) for x in f.read_text().splitlines() if x]
    return sorted(out, key=lambda a: a["t"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sparc-live-"))
    work.mkdir(parents=True, exist_ok=True)
    s = setup(work, args.items)
    deploy = work / "deploy.json"
    subprocess.run([*SPARC, "deploy", "--file", str(deploy), "--checkpoint", str(s["ckpts"]["v1"]), "--index",
                    f"images={work / 'v1' / 'images'}"], check=True, capture_output=True)  # fmt: skip
    (work / "admin.token").write_text("bench-admin-token")
    port = free_port()
    server = subprocess.Popen([*SPARC, "serve", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                               "--deployment", str(deploy), "--admin-token-file", str(work / "admin.token")],
                              stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    target = f"127.0.0.1:{port}"
    from service.client import SparcClient

    with SparcClient(target) as c:
        c.wait_ready(timeout=120)
    for p in run_clients(target, s["queries"], 0, 4, work, "cap"):
        p.join()
    cap = [a for a in read_answers(work, "cap") if a["ok"] and a["t"] > 1]
    capacity = len(cap) / 3.0
    rate = 0.7 * capacity / 2
    print(f"capacity: {capacity:.0f} queries/s with two clients searching flat out; the run: {2 * rate:.0f} queries/s "
          f"(70%) for {args.seconds:g} s", flush=True)  # fmt: skip
    steady_rss = rss_mb(server.pid)
    procs = run_clients(target, s["queries"], rate, args.seconds, work, "run")
    t_start = time.monotonic()
    events, rss = [], {"steady": steady_rss}
    third = args.seconds / 4

    def at(k: float) -> None:
        time.sleep(max(0.0, t_start + k * third - time.monotonic()))

    ids = np.arange(s["split"], s["n"])
    np.save(work / "rest_ids.npy", ids)
    at(1)
    t = time.monotonic() - t_start
    subprocess.run([*SPARC, "index", "add", "--bundle", str(work / "v1" / "images"), "--features", str(work / "rest.npy"),
                    "--ids", str(work / "rest_ids.npy"), "--quiet"], check=True, capture_output=True)  # fmt: skip
    server.send_signal(signal.SIGHUP)
    events.append((t, time.monotonic() - t_start, "index add of 10% + SIGHUP"))
    time.sleep(2)
    rss["after add"] = rss_mb(server.pid)
    at(2)
    t = time.monotonic() - t_start
    victims = np.random.default_rng(0).choice(s["n"], size=s["n"] // 20, replace=False)
    with SparcClient(target) as c:
        deleted, unknown = c.delete_items("bench-admin-token", "images", victims.tolist(), timeout=60)
    events.append((t, time.monotonic() - t_start, f"DeleteItems of 5% ({deleted} deleted, {len(unknown)} unknown)"))
    time.sleep(2)
    rss["after delete"] = rss_mb(server.pid)
    at(3)
    t = time.monotonic() - t_start
    np.save(work / "all.npy", np.concatenate([np.load(work / "first.npy"), np.load(work / "rest.npy")]))
    build_bundle(s["ckpts"]["v2"], "dino", work / "all.npy", work / "v2" / "images", progress=False)
    subprocess.run([*SPARC, "deploy", "--file", str(deploy), "--checkpoint", str(s["ckpts"]["v2"]), "--index",
                    f"images={work / 'v2' / 'images'}"], check=True, capture_output=True)  # fmt: skip
    server.send_signal(signal.SIGHUP)
    events.append((t, time.monotonic() - t_start, "rollover: sparc deploy of checkpoint v2 + rebuilt bundle, SIGHUP"))
    for p in procs:
        p.join()
    time.sleep(3)
    rss["end (old deployment drained)"] = rss_mb(server.pid)
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    answers = read_answers(work, "run")

    # each bundle version must always be answered with the same checkpoint, and the rollover's checkpoint only
    # with versions of the bundle built from it (older versions are pruned from disk, so they are told apart
    # by the checkpoint they answered with)
    from sparc_core import checkpoint_hash

    v2_ck = checkpoint_hash(s["ckpts"]["v2"])[:12]
    v2_versions = {v.name for v in (work / "v2" / "images").glob("v-*")}
    seen_with: dict[str, set[str]] = {}
    for a in answers:
        for v in a.get("v", []):
            seen_with.setdefault(v, set()).add(a["ck"])
    mixed = sum(
        1
        for a in answers
        if a["ok"]
        and (
            len(a["v"]) > 1
            or any(len(seen_with[v]) > 1 for v in a["v"])
            or any((a["ck"] == v2_ck) != (v in v2_versions) for v in a["v"])
        )
    )
    errors = sum(1 for a in answers if not a["ok"])
    print("\n| second | answered | errors | p50 ms | p99 ms | answering (checkpoint: versions) |\n|---|---|---|---|---|---|")
    for sec in range(int(args.seconds)):
        w = [a for a in answers if sec <= a["t"] < sec + 1]
        ok = [a["ms"] for a in w if a["ok"]]
        who = sorted({f"{a['ck'][:6]}:{','.join(x[-6:] for x in a['v'])}" for a in w if a["ok"]})
        mark = " ←" if any(sec <= e[0] < sec + 1 or sec <= e[1] < sec + 1 for e in events) else ""
        p50 = statistics.median(ok) if ok else float("nan")
        p99 = float(np.percentile(ok, 99)) if ok else float("nan")
        print(f"| {sec}{mark} | {len(ok)} | {len(w) - len(ok)} | {p50:.1f} | {p99:.1f} | {' '.join(who)} |")
    steady = [a["ms"] for a in answers if a["ok"] and not any(e[0] - 1 <= a["t"] <= e[1] + 2 for e in events)]
    steady_p99 = float(np.percentile(steady, 99))
    print("\n| event | started (s) | done (s) | p99 from start to done + 1 s | / steady p99 |\n|---|---|---|---|---|")
    for t, done, what in events:
        w = [a["ms"] for a in answers if a["ok"] and t <= a["t"] <= done + 1]
        p99 = float(np.percentile(w, 99)) if w else float("nan")
        print(f"| {what} | {t:.1f} | {done:.1f} | {p99:.1f} ms | {p99 / steady_p99:.2f}x |")
    print(
        f"\nanswers {len(answers)}, errors {errors}, answers mixing versions or checkpoints {mixed}; "
        f"steady p99 {steady_p99:.1f} ms"
    )
    print("server RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    m = read_manifest(work / "v1" / "images")
    gone = sum(p.n_deleted for p in m.parts)
    print(f"v1 bundle now: {m.n_items} rows, {gone} deleted, version {current_version(work / 'v1' / 'images').name}")
    out = (work / "server.log").read_text()
    print("server log, reload and deployment lines:")
    for line in out.splitlines():
        if any(k in line for k in ("index_reloaded", "index_refused", "deployed", "deployment_refused", "items_deleted")):
            print("  " + line[-200:])
    os._exit(0 if errors == 0 and mixed == 0 else 1)


if __name__ == "__main__":
    main()
