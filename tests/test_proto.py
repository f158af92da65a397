"""The proto follows buf's STANDARD lint rules, and no commit breaks the previous one on the wire.

buf comes from npm (``@bufbuild/buf``; ``.ci/run`` installs it into ``.buf/``); without it these tests skip
and say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def _buf() -> str:
    for cand in (os.environ.get("SPARC_BUF"), shutil.which("buf"), str(ROOT / ".buf/node_modules/.bin/buf")):
        if cand and Path(cand).is_file():
            return cand
    pytest.skip("buf is not installed (npm install --prefix .buf @bufbuild/buf, or put buf on PATH)")


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_proto_is_buf_lint_clean():
    r = _run("lint", "protos")
    assert r.returncode == 0, r.stdout + r.stderr


def test_buf_lint_catches_what_it_is_there_to_catch(tmp_path):
    """The same configuration on a proto with a service without the Service suffix, a zero enum value without
    _UNSPECIFIED and a request type shared by two RPCs: each is reported."""
    shutil.copy(PROTOS / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / "sparc" / "v1").mkdir(parents=True)
    (tmp_path / "sparc" / "v1" / "bad.proto").write_text(
        'syntax = "proto3";\npackage sparc.v1;\n'
        "service Bad {\n  rpc A(ARequest) returns (AResponse);\n  rpc B(ARequest) returns (AResponse);\n}\n"
        "message ARequest {}\nmessage AResponse {}\nenum Mode {\n  MODE_DEFAULT = 0;\n}\n"
    )
    r = _run("lint", str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert 'Service name "Bad" should be suffixed with "Service"' in out
    assert "MODE_DEFAULT" in out and "_UNSPECIFIED" in out
    assert "used as the request or response type for multiple RPCs" in out


def test_the_proto_does_not_break_the_previous_commit():
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no previous commit to compare with")
    prev = subprocess.run([git, "rev-parse", "--verify", "-q", "HEAD~1"], cwd=ROOT, capture_output=True, text=True)
    if prev.returncode != 0:
        pytest.skip("the checkout has no previous commit (a shallow clone): nothing to compare with")
    has = subprocess.run([git, "cat-file", "-e", "HEAD~1:protos/sparc/v1/sparc.proto"], cwd=ROOT, capture_output=True)
    if has.returncode != 0:
        pytest.skip("the previous commit has no protos/sparc/v1/sparc.proto")
    r = _run("breaking", "protos", "--against", ".git#ref=HEAD~1,subdir=protos")
    assert r.returncode == 0, r.stdout + r.stderr
