"""SIGKILL at random moments of every artefact write: the previous artefact always loads, with the results
of a complete write (a few kills each here; bench/chaos.py runs many)."""

from __future__ import annotations

import pytest

from service.chaos import chaos_checkpoint, chaos_extract, chaos_index_add, chaos_index_build


@pytest.mark.parametrize(
    "run, kills",
    [(chaos_checkpoint, 4), (chaos_index_build, 3), (chaos_index_add, 3), (chaos_extract, 2)],
    ids=["checkpoint", "index-build", "index-add", "extract"],
)
def test_kills_leave_a_loadable_artefact(run, kills, tmp_path):
    survived, tried, failures = run(tmp_path, kills, seed=7)
    assert (survived, tried) == (kills, kills), failures
