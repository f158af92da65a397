"""A fresh container: `sparc serve` with an empty numba cache answers its first query of every path as fast as
its hundredth (the kernels are compiled for the gallery's own array types before health says SERVING)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np

from index import build_bundle
from service.client import SparcClient, make_query, search_request
from sparc_core import SparcConfig, SparcModel, save_checkpoint


def test_the_first_query_after_serving_is_as_fast_as_the_hundredth(tmp_path):
    model = SparcModel(SparcConfig(streams={"a": 16, "b": 12}, n_latents=256, k=16))
    save_checkpoint(model, tmp_path / "ckpt")
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32))
    build_bundle(tmp_path / "ckpt", "a", tmp_path / "a.npy", tmp_path / "bundle", progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "numba").mkdir()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))  # empty: nothing compiled yet
    cmd = [sys.executable, "-m", "sparc_core.cli", "serve", "--checkpoint", str(tmp_path / "ckpt"),
           "--index", f"g={tmp_path / 'bundle'}", "--port", str(port), "--metrics-port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with SparcClient(f"127.0.0.1:{port}") as c:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if c.health(timeout=1) == "SERVING":
                        break
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
            rng = np.random.default_rng(1)
            paths = {"sparse": {}, "approx": {"path": "approx"}, "filtered": {"require": [1], "exclude": [2]},
                     "boosted": {"boost": {3: 1.0}}, "explained": {"explain": True}}  # fmt: skip
            first, later = {}, {}
            for rounds, into in ((1, first), (20, later)):
                for name, kw in paths.items():
                    times = []
                    for _ in range(rounds):
                        req = search_request(make_query(stream="a", vector=rng.standard_normal(16)), ["g"], top_k=10, **kw)
                        t0 = time.perf_counter()
                        assert c.search(req, timeout=60).hits
                        times.append(time.perf_counter() - t0)
                    into[name] = float(np.median(times))
            for name in paths:
                assert first[name] < 0.1, (name, first, later)  # no compile on the first query of any path
    finally:
        proc.terminate()
        proc.wait(30)
