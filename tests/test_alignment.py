"""The alignment benchmark, reduced: two small worlds the defaults were not tuned on, defaults vs the paper's recipe.

The full table is ``bench/alignment.py`` (8 worlds, 40 minutes); this keeps its targets from regressing
in CI, with margins stated beside each assertion (short training gives a little less than the bench).
"""

from __future__ import annotations

import pytest

from sparc_core.alignment import PAPER, run, world_data
from sparc_core.synthetic import preset

DIMS = {"dino": 128, "clip_img": 96, "clip_txt": 96}
STEPS = 300


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, dict]]:
    root = tmp_path_factory.mktemp("align")
    worlds = {  # dictionary 0.5x and 6x the concept inventory
        "groups-0.5x": (preset("groups", n_concepts=200, streams=DIMS, n_train=8000, n_eval=2000, seed=3), 100),
        "hierarchy-6x": (preset("hierarchy", n_concepts=150, streams=DIMS, n_train=8000, n_eval=2000, seed=4), 900),
    }
    out: dict[str, dict[str, dict]] = {}
    for name, (world, n_latents) in worlds.items():
        data = world_data(world, root / name / "data")
        base = {"n_latents": n_latents, "k": 32, "steps": STEPS, "batch_size": 128}
        out[name] = {
            "defaults": run(world, base, root / name / "defaults", data=data),
            "paper": run(world, base | PAPER, root / name / "paper", data=data),
        }
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", ["groups-0.5x", "hierarchy-6x"])
def test_defaults_hold_on_worlds_they_were_not_tuned_on(results, world):
    ours, paper = results[world]["defaults"], results[world]["paper"]
    # one-stream agreement: target 0.85 x the ceiling (margin 0.15 for 300 steps on a 100-latent
    # dictionary; measured 0.78 and 0.92), well above the paper's (measured +0.25 and +0.53)
    assert ours["jaccard_vs_ceiling"] >= 0.70, ours
    assert ours["jaccard_vs_ceiling"] >= paper["jaccard_vs_ceiling"] + 0.15, (ours, paper)
    # reconstruction no worse than the paper's recipe (shared code + the stream's private dictionary)
    assert ours["nmse_self"] <= paper["nmse_self"] + 0.02, (ours["nmse_self"], paper["nmse_self"])
    # text -> DINO retrieval well above chance (1/2000) and not below the paper's (margin 0.05)
    r1 = ours["clip_txt->dino latent"]["R@1"]
    assert r1 >= paper["clip_txt->dino latent"]["R@1"] - 0.05 and r1 >= 0.4, (r1, paper["clip_txt->dino latent"])
    # dead latents (each stream encoded alone) after pruning: target < 1% / <= 10% (margin x2)
    limit = 0.02 if ours["n_latents"]["requested"] <= 200 else 0.20
    assert max(ours["dead"].values()) <= limit, ours["dead"]
