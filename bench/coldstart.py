"""Cold start: `sparc serve` in a fresh process with an EMPTY numba cache (a fresh container without the
image's compiled kernels), then the first query of every search path after health says SERVING, beside the
median of the next 20 distinct queries of the same path.

    python bench/coldstart.py [--items 5000]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=5000)
    args = ap.parse_args()
    from index import build_bundle
    from service.client import SparcClient, make_query, search_request
    from sparc_core import SparcConfig, SparcModel, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="sparc-cold-") as d:
        root = Path(d)
        save_checkpoint(SparcModel(SparcConfig(streams={"a": 16, "b": 12}, n_latents=256, k=16)), root / "ckpt")
        np.save(root / "a.npy", np.random.default_rng(0).standard_normal((args.items, 16)).astype(np.float32))
        build_bundle(root / "ckpt", "a", root / "a.npy", root / "bundle", progress=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (root / "numba").mkdir()
        env = dict(os.environ, NUMBA_CACHE_DIR=str(root / "numba"))
        cmd = [sys.executable, "-m", "sparc_core.cli", "serve", "--checkpoint", str(root / "ckpt"),
               "--index", f"g={root / 'bundle'}", "--port", str(port), "--metrics-port", "0"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with SparcClient(f"127.0.0.1:{port}") as c:
                while True:
                    try:
                        if c.health(timeout=1) == "SERVING":
                            break
                    except Exception:  # noqa: BLE001 - not listening yet
                        pass
                    time.sleep(0.05)
                print(f"SERVING {time.perf_counter() - t0:.1f} s after start (empty numba cache: kernels compiled first)")
                rng = np.random.default_rng(1)
                paths = {"sparse": {}, "approx": {"path": "approx"}, "filtered": {"require": [1], "exclude": [2]},
                         "boosted": {"boost": {3: 1.0}}, "explained": {"explain": True}}  # fmt: skip
                print("| path | first query ms | median of the next 20 ms |\n|---|---|---|")
                for name, kw in paths.items():
                    times = []
                    for _ in range(21):
                        req = search_request(make_query(stream="a", vector=rng.standard_normal(16)), ["g"], top_k=10, **kw)
                        t = time.perf_counter()
                        c.search(req, timeout=120)
                        times.append(1e3 * (time.perf_counter() - t))
                    print(f"| {name} | {times[0]:.1f} | {float(np.median(times[1:])):.1f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
