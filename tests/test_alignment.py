"""The alignment benchmark, reduced: small worlds the defaults were not tuned on, defaults vs the paper's recipe.

The full table is ``bench/alignment.py``; this keeps its targets from regressing in CI, with margins stated
beside each assertion (short training gives a little less than the bench).
"""

from __future__ import annotations

import pytest

from sparc_core.worlds.alignment import PAPER, run, world_data
from sparc_core.worlds.synthetic import preset

DIMS = {"dino": 128, "clip_img": 96, "clip_txt": 96}
STEPS = 300
PAIRS = ("clip_txt->dino", "clip_txt->clip_img")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, dict]]:
    root = tmp_path_factory.mktemp("align")
    worlds = {  # (world, dictionary size, configurations): dictionaries 0.5x, 6x and 1/3x the concept inventory
        "groups-0.5x": (
            preset("groups", n_concepts=200, streams=DIMS, n_train=8000, n_eval=2000, seed=3),
            100,
            ("defaults", "paper"),
        ),
        "hierarchy-6x": (
            preset("hierarchy", n_concepts=150, streams=DIMS, n_train=8000, n_eval=2000, seed=4),
            900,
            ("defaults", "paper"),
        ),
        # concepts outnumber latents 3x in a hierarchy, a correlated CLIP text tower: raw CLIP is a real rival
        "open-0.33x": (
            preset("hierarchy", n_concepts=600, tower_correlation=0.6, streams=DIMS, n_train=8000, n_eval=2000, seed=5),
            200,
            ("defaults",),
        ),
    }
    out: dict[str, dict[str, dict]] = {}
    for name, (world, n_latents, configs) in worlds.items():
        data = world_data(world, root / name / "data")
        base = {"n_latents": n_latents, "k": 32, "steps": STEPS, "batch_size": 128}
        overrides = {"defaults": {}, "paper": PAPER}
        out[name] = {c: run(world, base | overrides[c], root / name / c, data=data) for c in configs}
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
    # dead latents (each stream encoded alone: latents in no served search code) after pruning: target < 1% /
    # <= 10% (margin x2)
    limit = 0.02 if ours["n_latents"]["requested"] <= 200 else 0.20
    assert max(ours["dead_search"].values()) <= limit, (ours["dead_search"], ours["dead"])


@pytest.mark.slow
@pytest.mark.parametrize("world", ["groups-0.5x", "hierarchy-6x", "open-0.33x"])
def test_served_code_retrieves_as_well_as_plain_topk_and_raw_clip(results, world):
    ours = results[world]["defaults"]
    for pair in PAIRS:
        served, topk = ours[f"{pair} latent"]["R@1"], ours[f"{pair} latent_topk"]["R@1"]
        # the served search code never trades retrieval for agreement: at most 0.02 below the same model's
        # plain top-k code (the oracle of binary concept sets is no bound: codes also carry amounts)
        assert served >= topk - 0.02, (pair, served, topk, ours["soft_weight"])
    # a user without SPARC would search raw CLIP: the served code must not do worse
    raw = ours["raw clip_txt->clip_img R@1"]
    assert ours["clip_txt->clip_img latent"]["R@1"] >= raw, (ours["clip_txt->clip_img latent"], raw)
