"""What differs between the Pythons ``requires-python`` declares, checked on each of them.

`.ci/run` runs this file and the index, hardening and service tests (``PYTHONS_TESTS``) on the
lowest and the newest declared CPython as well as the full suite on the machine's own. Before 3.11,
``concurrent.futures.TimeoutError`` is not the builtin ``TimeoutError``: a wait with a timeout that caught
the builtin let every gradient call (and every encode batch over 50 ms) escape as INTERNAL there.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from index import SearchStopped
from service.errors import ResourceExhausted
from service.lanes import GradientLane

pytestmark = pytest.mark.pythons
ROOT = Path(__file__).resolve().parents[1]


def test_a_gradient_call_longer_than_the_poll_returns_its_result():
    lane = GradientLane(model=None, encoders={}, capacity=2)
    try:
        t = time.perf_counter()
        assert lane.run(lambda m, e: (time.sleep(0.2), "done")[1], poll=0.02) == "done"
        assert time.perf_counter() - t >= 0.2
    finally:
        lane.close()


def test_a_gradient_call_stops_at_its_deadline_and_the_lane_refuses_beyond_capacity():
    lane = GradientLane(model=None, encoders={}, capacity=1)
    gate = threading.Event()
    try:
        deadline = time.monotonic() + 0.15
        t = time.perf_counter()
        with pytest.raises(SearchStopped):
            lane.run(lambda m, e: gate.wait(5), should_stop=lambda: time.monotonic() > deadline, poll=0.02)
        assert time.perf_counter() - t < 1.0  # answered at the deadline, not when the job ends
        with pytest.raises(ResourceExhausted):  # the dropped job still holds its slot until it ends
            lane.run(lambda m, e: None)
    finally:
        gate.set()
        lane.close()


def _declared() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    lo = re.search(r'requires-python = ">=3\.(\d+)(?:,\s*<3\.(\d+))?"', text)
    assert lo, "requires-python must read '>=3.X' or '>=3.X,<3.Y'"
    return int(lo.group(1)), int(lo.group(2) or 99)


def test_this_python_is_one_the_project_declares_and_ci_runs():
    lo, hi = _declared()
    assert lo <= sys.version_info.minor < hi
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"3.{lo}" in ci, f"requires-python admits 3.{lo}, which .ci/run does not test"
    target = re.search(r'target-version = "py3(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert target and int(target.group(1)) == lo, "ruff's target-version must be the lowest declared Python"
