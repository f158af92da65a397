"""Chaos harness: SIGKILL a process at random moments while it writes an artefact (checkpoint save, index
build, `index add`, feature extraction), then check that what is on disk loads and gives exactly the results
of a complete write. Used by tests/test_chaos.py (a few kills, in CI) and bench/chaos.py (many).

Each ``chaos_*`` function returns (survived, tried, failures): a kill survives when the artefact still loads
afterwards and its contents equal those of some complete write (never a mix, never a torn file).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
Result = tuple[int, int, list[str]]


def _kill_after(cmd: list[str], delay: float, ready: str | None = "READY", timeout: float = 120) -> None:
    """Start ``cmd``, wait for its ``ready`` line (imports done), sleep ``delay`` more, SIGKILL it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        if ready is not None:
            t0 = time.monotonic()
            while proc.stdout is not None and time.monotonic() - t0 < timeout:
                line = proc.stdout.readline()
                if not line or line.strip() == ready:
                    break
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)


def _run_kills(kills: int, seed: int, start: Callable[[float], None], check: Callable[[], str | None], span: float) -> Result:
    rng = random.Random(seed)
    failures = []
    for i in range(kills):
        start(rng.uniform(0.0, span))
        problem = check()
        if problem is not None:
            failures.append(f"kill {i}: {problem}")
    return kills - len(failures), kills, failures


# ---- checkpoint save ------------------------------------------------------------------------------------
_SAVER = """
import sys, torch
from sparc_core import SparcModel, save_checkpoint
from sparc_core.checkpoint import read_checkpoint_config
from sparc_core.config import SparcConfig
out = sys.argv[1]
model = SparcModel(SparcConfig.model_validate_json(sys.argv[2]), seed=0)
step = int(read_checkpoint_config(out)["step"])
print("READY", flush=True)
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step % 997) / 997)
    state = {"tensors": {"m": torch.full((200_000,), float(step))}, "meta": {"step": step}}
    save_checkpoint(model, out, step=step, train_state=state)
"""


def chaos_checkpoint(work: Path, kills: int, seed: int = 0) -> Result:
    from sparc_core import SparcConfig, SparcModel, load_checkpoint, save_checkpoint
    from sparc_core.checkpoint import load_train_state, read_checkpoint_config

    cfg = SparcConfig(streams={"a": 256, "b": 192}, n_latents=1024, k=16, auxk=32)
    out = work / "ckpt"
    save_checkpoint(SparcModel(cfg, seed=0), out, step=0)

    def check() -> str | None:
        try:
            model = load_checkpoint(out)
            step = int(read_checkpoint_config(out)["step"])
        except Exception as e:  # noqa: BLE001 - any failure to load is what we count
            return f"does not load: {e}"
        if step > 0:
            want = float(step % 997) / 997
            if not all(bool(torch.all(p == want)) for p in model.parameters()):
                return f"weights are not those of step {step}"
            tensors, meta = load_train_state(out)
            if meta["step"] != step or float(tensors["m"][0]) != step:
                return f"train state is not that of step {step}"
        return None

    return _run_kills(
        kills,
        seed,
        lambda d: _kill_after([sys.executable, "-c", _SAVER, str(out), cfg.model_dump_json()], d),
        check,
        span=1.5,
    )


# ---- index build and index add ---------------------------------------------------------------------------
def _index_world(work: Path, n: int) -> tuple[Path, Path, Path]:
    from sparc_core import SparcConfig, SparcModel, save_checkpoint

    ckpt = work / "ckpt"
    if not ckpt.exists():
        save_checkpoint(SparcModel(SparcConfig(streams={"img": 64, "txt": 48}, n_latents=512, k=16, auxk=32), seed=1), ckpt)
    rng = np.random.default_rng(0)
    a, b = work / "a.npy", work / "b.npy"
    np.save(a, rng.standard_normal((n, 64)).astype(np.float32))
    np.save(b, rng.standard_normal((n + n // 2, 64)).astype(np.float32))
    return ckpt, a, b


_BUILDER = """
import sys
from index import build_bundle
ckpt, a, b, out = sys.argv[1:5]
print("READY", flush=True)
i = 0
while True:
    build_bundle(ckpt, "img", (a, b)[i % 2], out, progress=False)
    i += 1
"""


def _search_signature(bundle: Path, xq: np.ndarray) -> tuple:
    from index import Searcher
    from index.params import SearchPath

    s = Searcher(bundle)
    r = s.search(("txt", xq), top_k=5, path=SearchPath.SPARSE)
    d = s.search(("txt", xq), top_k=5, path=SearchPath.DENSE)
    return s.n_items, r.ids, r.scores, d.ids


def chaos_index_build(work: Path, kills: int, seed: int = 0, n: int = 20_000) -> Result:
    from index import build_bundle

    ckpt, a, b = _index_world(work, n)
    xq = np.random.default_rng(1).standard_normal((8, 48)).astype(np.float32)
    refs = {}
    for f in (a, b):  # the results of a complete build of each gallery
        build_bundle(ckpt, "img", f, work / f"ref-{f.stem}", progress=False)
        refs[f.stem] = _search_signature(work / f"ref-{f.stem}", xq)
    out = work / "bundle"
    build_bundle(ckpt, "img", a, out, progress=False)

    def check() -> str | None:
        try:
            sig = _search_signature(out, xq)
        except Exception as e:  # noqa: BLE001
            return f"does not load: {e}"
        if sig not in refs.values():
            return "results differ from every complete build"
        return None

    return _run_kills(
        kills, seed, lambda d: _kill_after([sys.executable, "-c", _BUILDER, str(ckpt), str(a), str(b), str(out)], d), check, 2.0
    )


_ADDER = """
import sys
import numpy as np
from index import append_to_bundle, read_manifest
out, pool = sys.argv[1:3]
feats = np.load(pool)
print("READY", flush=True)
while True:
    n = read_manifest(out).n_items
    rows = (np.arange(n, n + 500) % len(feats))
    np.save(out + ".next.npy", feats[rows])
    append_to_bundle(out, out + ".next.npy", progress=False)
"""


def chaos_index_add(work: Path, kills: int, seed: int = 0, n: int = 5_000) -> Result:
    from index import Bundle, build_bundle
    from sparc_core import load_checkpoint

    ckpt, a, _ = _index_world(work, n)
    pool = np.load(a)
    model = load_checkpoint(ckpt)
    ref = model.encode({"img": torch.from_numpy(pool)})  # item i holds pool row i % len(pool)
    ref_idx = ref.indices.numpy()
    ref_val = torch.nn.functional.normalize(ref.values, dim=1).numpy()  # bundles store unit codes (fp16)
    out = work / "grow"
    build_bundle(ckpt, "img", a, out, progress=False)

    def check() -> str | None:
        try:
            b = Bundle(out)
        except Exception as e:  # noqa: BLE001
            return f"does not load: {e}"
        m = b.manifest.n_items
        if (m - n) % 500 or not np.array_equal(b.all_ids(), np.arange(m)):
            return f"{m} items / ids are not those of complete adds"
        rows = np.arange(m) % len(pool)
        got_idx, got_val = b.codes(np.arange(m))
        same = np.sort(got_idx, 1) == np.sort(ref_idx[rows], 1)
        if not same.all() or not np.allclose(np.sort(got_val, 1), np.sort(ref_val[rows], 1), atol=2e-3):
            return "stored codes differ from the items' codes"
        return None

    return _run_kills(kills, seed, lambda d: _kill_after([sys.executable, "-c", _ADDER, str(out), str(a)], d), check, span=2.0)


# ---- feature extraction -----------------------------------------------------------------------------------
def chaos_extract(work: Path, kills: int, seed: int = 0, n_images: int = 120) -> Result:
    """Kill `sparc extract` at random moments and rerun it each time: every chunk on disk always loads, and
    the run that finishes gives files byte-identical to an uninterrupted extraction."""
    from safetensors import safe_open

    from sparc_core.cli import main
    from sparc_core.encoders import tiny as tm

    captions = tm.write_images(work / "images", n_images)
    clip, dino = tm.write_clip_dir(work / "clip"), tm.write_dino_official(work / "dinov2_vits14_reg4_pretrain.pth")

    def argv(out: Path) -> list[str]:
        return [
            "extract", "--images", str(work / "images"), "--captions", str(captions), "--out", str(out),
            "--clip-weights", str(clip), "--dino-model", tm.DINO_ARCH, "--dino-weights", str(dino),
            "--dino-model-args", json.dumps(tm.DINO_ARGS), "--dino-image-size", str(tm.DINO_SIZE),
            "--batch-size", "8", "--chunk-size", "16", "--workers", "0", "--quiet",
        ]  # fmt: skip

    def files(out: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "extract.json"}

    assert main(argv(work / "full")) == 0
    reference = files(work / "full")
    out = work / "killed"
    cmd = [sys.executable, "-c", "import sys; from sparc_core.cli import main; sys.exit(main(sys.argv[1:]))", *argv(out)]

    def check() -> str | None:
        for chunk in (out / "chunks").glob("chunk_*.safetensors") if (out / "chunks").is_dir() else []:
            try:
                with safe_open(chunk, framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            except Exception as e:  # noqa: BLE001
                return f"{chunk.name} does not load: {e}"
        if (out / "extract.json").is_file() and files(out) != reference:
            return "a finished extraction differs from the uninterrupted one"
        return None

    result = _run_kills(kills, seed, lambda d: _kill_after(cmd, 1.0 + d, ready=None), check, span=3.0)
    if main(argv(out)) != 0 or files(out) != reference:  # resuming after the last kill completes it exactly
        survived, tried, failures = result
        return survived - 1, tried, [*failures, "the resumed extraction differs from the uninterrupted one"]
    return result


# ---- idle streams ------------------------------------------------------------------------------------------
class IdleStreams:
    """``n`` SearchStream calls from one client that send nothing until ``close()``; ``refused`` collects the
    status codes of those the server turned away."""

    def __init__(self, target: str, n: int, timeout: float = 120) -> None:
        import threading

        import grpc

        from service.wire import pb_grpc

        self.channel = grpc.insecure_channel(target)
        stub = pb_grpc.SparcServiceStub(self.channel)
        self.stop = threading.Event()
        self.refused: list = []

        def idle():
            self.stop.wait()
            return
            yield

        def hold():
            try:
                for _ in stub.SearchStream(idle(), timeout=timeout):
                    pass
            except grpc.RpcError as e:
                self.refused.append(e.code())

        self.threads = [threading.Thread(target=hold, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def wait_refused(self, count: int, timeout: float = 10) -> int:
        t0 = time.monotonic()
        while len(self.refused) < count and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        return len(self.refused)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        self.channel.close()


def stop_during(server, call, after: float, join: float = 30) -> tuple[float, list]:
    """Run ``call()`` (a client call that raises grpc.RpcError when refused) in a thread, stop ``server``
    ``after`` seconds in; returns (seconds the stop took, status codes the call saw)."""
    import threading

    import grpc

    errors: list = []

    def run():
        try:
            call()
        except grpc.RpcError as e:
            errors.append(e.code())

    t = threading.Thread(target=run)
    t.start()
    time.sleep(after)
    t0 = time.perf_counter()
    server.stop()
    took = time.perf_counter() - t0
    t.join(join)
    return took, errors


class SilentBodies:
    """``n`` unary calls to ``method`` whose request body never arrives (headers sent, then nothing until
    ``close()``), optionally with ``metadata``; ``codes`` collects how each ended."""

    def __init__(self, target: str, n: int, method: str = "/sparc.v1.SparcService/Search", metadata=(), timeout: float = 60):
        import threading

        import grpc

        self.channel = grpc.insecure_channel(target)
        self.stop = threading.Event()
        self.codes: list = []
        call = self.channel.stream_unary(method)  # a unary method, fed as a stream that never sends

        def never():
            self.stop.wait()
            return
            yield

        def hold():
            try:
                call(never(), timeout=timeout, metadata=metadata)
                self.codes.append("OK")
            except grpc.RpcError as e:
                self.codes.append(e.code())

        self.threads = [threading.Thread(target=hold, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def wait(self, count: int, timeout: float = 10) -> int:
        t0 = time.monotonic()
        while len(self.codes) < count and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        return len(self.codes)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        self.channel.close()


class HealthWatchers:
    """``n`` health Watch streams (no token needed), held open until ``close()``."""

    def __init__(self, target: str, n: int, timeout: float = 60) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.channel = grpc.insecure_channel(target)
        stub = health_pb2_grpc.HealthStub(self.channel)
        self.calls = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout) for _ in range(n)]
        self.first: list = []
        for c in self.calls:
            try:
                self.first.append(next(c).status)
            except grpc.RpcError as e:
                self.first.append(e.code())

    def close(self) -> None:
        for c in self.calls:
            c.cancel()
        self.channel.close()
