"""Generate the Python gRPC stubs from protos/ with grpcio-tools: the one place stubs come from.

    python -m service.protogen            # (re)generate service/_proto/ from protos/

Generated modules live in ``service/_proto/`` (not committed, never edited by hand) with their imports
rewritten to be package-relative. Wheels get them at build time (setup.py runs this); an editable
checkout generates them on first import when the .proto changed or they are missing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ["sparc/v1/sparc.proto"]
OUT = Path(__file__).resolve().parent / "_proto"
STAMP = "STAMP"


def _grpc_tools():
    try:
        import grpc_tools
    except ImportError:
        raise RuntimeError(
            "a source checkout generates its gRPC stubs from protos/ with grpcio-tools, which is not installed: "
            "pip install -e '.[dev]' (installed wheels carry the stubs already)"
        ) from None
    return grpc_tools


def _fingerprint(proto_root: Path) -> str:
    grpc_tools = _grpc_tools()

    h = hashlib.sha256(getattr(grpc_tools, "__version__", "unknown").encode())
    for rel in PROTO_FILES:
        h.update((proto_root / rel).read_bytes())
    return h.hexdigest()


def generate(proto_root: Path = PROTO_ROOT, out: Path = OUT) -> Path:
    """Run protoc (from grpcio-tools) into ``out`` atomically; returns ``out``."""
    _grpc_tools()
    from grpc_tools import protoc

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="._proto-", dir=out.parent))
    try:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(proto_root / p) for p in PROTO_FILES],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILES} in {proto_root}")
        for d in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
            (d / "__init__.py").touch()
        for py in tmp.rglob("*_pb2*.py"):
            text = py.read_text()
            # "from sparc.v1 import sparc_pb2 as ..." -> "from . import sparc_pb2 as ..."
            text = re.sub(r"^from sparc\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
            py.write_text(text)
        (tmp / STAMP).write_text(_fingerprint(proto_root))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_stubs() -> None:
    """Generate the stubs if they are missing or older than the .proto (editable checkouts only)."""
    stamp = OUT / STAMP
    if PROTO_ROOT.is_dir():
        import importlib.util

        if stamp.is_file() and importlib.util.find_spec("grpc_tools") is None:
            return  # generated before; without grpcio-tools (the dev extra) they cannot be checked or refreshed
        if not stamp.is_file() or stamp.read_text() != _fingerprint(PROTO_ROOT):
            generate()
    elif not stamp.is_file():
        raise RuntimeError(f"gRPC stubs missing in {OUT} and no protos/ to generate them from; reinstall sparc")


if __name__ == "__main__":
    print(f"generated {generate()}", file=sys.stderr)
