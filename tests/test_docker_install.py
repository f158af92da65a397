"""The Docker image's install, reproduced without docker: the wheel is built from exactly the files the
Dockerfile copies, installed into a fresh virtual environment, and `sparc serve` from that install, with an
empty numba cache (a fresh container), passes the image's HEALTHCHECK and answers its first query of every
search path as fast as its twentieth (the kernels are compiled for the gallery's own array types before
health says SERVING)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY of the build context (not --from another stage)."""
    out = []
    for line in DOCKERFILE.replace("\\\n", " ").splitlines():
        if not line.startswith("COPY"):
            continue  # only COPY lines are shell-split (comments and RUN lines may hold any quote)
        parts = shlex.split(line)
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            args = [p for p in parts[1:] if not p.startswith("--")]
            out.append((args[:-1], args[-1]))
    return out


def _copy_context(dest_root: Path) -> None:
    for sources, dest in _copies():
        for src in sources:
            target = dest_root / (Path(dest) / Path(src).name if dest.endswith("/") or len(sources) > 1 else dest)
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / src).is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "_proto", "*.pyc")
                shutil.copytree(ROOT / src, target, ignore=ignore, dirs_exist_ok=True)
            else:
                shutil.copy2(ROOT / src, target)


def _dependencies_only(fresh_site: Path, deps: Path) -> None:
    """Make this environment's third-party packages visible to the fresh one, but not its sparc install."""
    deps.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if "sparc" in entry.name.lower() or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    (fresh_site / "_sparc_test_deps.pth").write_text(str(deps) + "\n")


def _first_queries_are_as_fast_as_later_ones(port: int, queries: np.ndarray) -> None:
    from service.client import SparcClient, make_query, search_request

    with SparcClient(f"127.0.0.1:{port}") as c:
        code = c.encode(make_query(stream="clip_txt", vector=queries[0])).code
        on, off = int(code.indices[0]), next(i for i in range(1 << 16) if i not in set(code.indices))
        paths = {"sparse": {}, "approx": {"path": "approx"}, "filtered": {"require": [on], "exclude": [off]},
                 "boosted": {"boost": {on: 1.0}}, "explained": {"explain": True}}  # fmt: skip
        first, later, row = {}, {}, 0
        for rounds, into in ((1, first), (20, later)):
            for name, kw in paths.items():
                times = []
                for _ in range(rounds):
                    row += 1  # every query a different caption vector
                    req = search_request(make_query(stream="clip_txt", vector=queries[row]), ["dino"], top_k=10, **kw)
                    t0 = time.perf_counter()
                    assert c.search(req, timeout=60).hits, name
                    times.append(time.perf_counter() - t0)
                into[name] = float(np.median(times))
    for name in paths:
        assert first[name] < 0.1, (name, first, later)  # no compile on the first query of any path


def test_the_dockerfile_copies_what_the_build_needs():
    copied = {Path(s).name for sources, _ in _copies() for s in sources}
    assert {"pyproject.toml", "setup.py", "protos", "sparc_core", "index", "service"} <= copied
    assert "pip wheel" in DOCKERFILE and "USER sparc" in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "service/_proto"} <= set(ignored)


@pytest.mark.slow
def test_the_copied_files_install_start_pass_the_healthcheck_and_answer_at_once(trained_checkpoint, medium_synth, tmp_path):
    from index import build_bundle

    src = tmp_path / "src"
    _copy_context(src)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(src)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("sparc-*.whl")
    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(fresh)
    py = fresh / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
        ).stdout.strip()
    )
    _dependencies_only(fresh_site, tmp_path / "deps")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The installed package, not a checkout, is what runs: its gRPC stubs came from the build hook.
    where = subprocess.run(
        [py, "-c", "import service, service.server; print(service.__file__)"], capture_output=True, text=True, cwd=tmp_path
    )
    assert where.returncode == 0, where.stderr
    installed = Path(where.stdout.strip()).parent
    assert installed.is_relative_to(fresh), installed
    assert (installed / "_proto" / "sparc" / "v1" / "sparc_pb2_grpc.py").is_file()

    bundle = tmp_path / "bundles" / "dino"
    build_bundle(trained_checkpoint, "dino", medium_synth / "eval" / "dino.npy", bundle, progress=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARC_")} | {
        "SPARC_HOST": "127.0.0.1",
        "SPARC_PORT": str(port),
        "SPARC_METRICS_PORT": "0",
        "SPARC_CHECKPOINT": str(trained_checkpoint),
        "SPARC_INDEXES": json.dumps({"dino": [str(bundle)]}),
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),  # empty, as in a container built without warming it
    }
    entry = re.search(r'ENTRYPOINT \["sparc", "serve"\]', DOCKERFILE)
    assert entry is not None
    proc = subprocess.Popen(
        [str(fresh / "bin" / "sparc"), "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for _ in range(40):  # structured log lines come first
            line = proc.stdout.readline()
            lines.append(line)
            if "sparc serving" in line or not line:
                break
        assert "sparc serving" in lines[-1], "".join(lines)
        probe = re.search(r'HEALTHCHECK .* CMD \["python", "-m", "([\w.]+)"\]', DOCKERFILE).group(1)
        check = subprocess.run([py, "-m", probe], timeout=30, cwd=tmp_path, env=env)  # the server's own settings
        assert check.returncode == 0
        wrong = env | {"SPARC_PORT": str(port + 1 if port < 65535 else port - 1)}
        assert subprocess.run([py, "-m", probe], timeout=30, cwd=tmp_path, env=wrong).returncode == 1
        _first_queries_are_as_fast_as_later_ones(port, np.load(medium_synth / "eval" / "clip_txt.npy"))
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
