"""Planted-concept data, metrics on hand-made codes, and config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparc_core import ConfigError, SparseCode, SynthConfig, TrainConfig
from sparc_core.config import build_config, load_config_file
from sparc_core.metrics import (
    dead_expected,
    dead_fraction,
    empty_share,
    label_weighted_jaccard,
    latent_rates,
    per_sample_jaccard,
    retrieval_scores,
)
from sparc_core.worlds.synthetic import PlantedConcepts


def test_synthetic_streams_are_paired_scaled_and_labelled():
    cfg = SynthConfig(n_concepts=50, concepts_per_sample=3.0, shared_fraction=0.8)
    world = PlantedConcepts(cfg)
    feats, labels = world.sample(400, seed=1)
    assert {s: x.shape for s, x in feats.items()} == {"dino": (400, 1024), "clip_img": (400, 768), "clip_txt": (400, 768)}
    for s in ("clip_img", "clip_txt"):
        np.testing.assert_allclose(np.linalg.norm(feats[s], axis=1), 1.0, rtol=1e-5)
    assert np.linalg.norm(feats["dino"], axis=1).mean() == pytest.approx(cfg.raw_scale, rel=1e-3)
    assert labels.shape == (400, 50) and labels.sum(1).min() >= 1
    assert world.visible.all(0).sum() == 40  # 80% of concepts seen by every stream
    assert (world.visible.sum(0) >= 1).all()
    # Zipf-like: the most frequent concept is much commoner than the rarest.
    counts = labels.sum(0)
    assert counts[:5].mean() > 3 * counts[-5:].mean()
    # Same seed, same data; another seed, other samples from the same world.
    again, _ = world.sample(400, seed=1)
    np.testing.assert_array_equal(again["dino"], feats["dino"])
    other, _ = world.sample(400, seed=2)
    assert not np.allclose(other["dino"], feats["dino"])


def test_paired_streams_share_their_concepts():
    world = PlantedConcepts(SynthConfig(n_concepts=30, concepts_per_sample=4.0, shared_fraction=1.0))
    feats, _ = world.sample(3000, seed=0)
    a, b = feats["clip_img"], feats["clip_txt"]
    # A linear map fitted on 2,500 pairs predicts held-out clip_txt rows from their clip_img rows far
    # better than from shuffled (unpaired) rows: the streams carry the same concepts.
    w, *_ = np.linalg.lstsq(a[:2500], b[:2500], rcond=None)
    paired = np.mean((a[2500:] @ w - b[2500:]) ** 2)
    shuffled = np.mean((a[2500:][::-1] @ w - b[2500:]) ** 2)
    assert paired < 0.2 * shuffled


def _code(rows: list[list[int]], vals: list[list[float]] | None = None, n: int = 10) -> SparseCode:
    idx = torch.tensor(rows)
    v = torch.tensor(vals) if vals is not None else torch.ones(idx.shape)
    return SparseCode(idx, v, n)


def test_per_sample_jaccard_counts_only_active_latents():
    a = _code([[0, 1, 2], [3, 4, 5]])
    b = _code([[0, 1, 7], [3, 4, 5]], [[1, 1, 1], [1, 1, 0]])  # latent 5 is chosen but not active
    assert per_sample_jaccard(a, b) == pytest.approx((2 / 4 + 2 / 3) / 2)


def test_two_silent_codes_agree_on_nothing():
    # a calibration that silences every latent must not score a perfect agreement
    silent = _code([[0, 1], [2, 3]], [[0, 0], [0, 0]])
    assert per_sample_jaccard(silent, silent) == 0.0
    half = _code([[0, 1], [2, 3]], [[1, 1], [0, 0]])  # one row agrees fully, the other is silent in both
    assert per_sample_jaccard(half, half) == pytest.approx(0.5)
    assert empty_share(half) == pytest.approx(0.5) and empty_share(silent) == 1.0


def test_dead_fraction_and_label_weighted_jaccard():
    a = _code([[0, 1], [0, 2]])
    assert dead_fraction(a) == pytest.approx(0.7)
    labels = np.array([[1, 0], [0, 1]])
    same = label_weighted_jaccard(a, a, labels)
    assert same == pytest.approx(1.0)
    swapped = _code([[0, 2], [0, 1]])  # latents 1 and 2 mean the other concept in the second stream
    assert label_weighted_jaccard(a, swapped, labels) == pytest.approx((1.0 + 0 + 0) / 3)


def test_rare_latents_are_absent_from_a_small_sample_as_often_as_their_rates_say():
    # rates on "training rows" of a code whose latent j fires with probability p[j]; a fresh sample of n rows
    # misses latent j with probability (1 - p[j])^n, and the measured dead fraction of fresh samples follows
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.05, 0.01, 0.002, 0.0005, 0.0] + [0.02] * 4)

    def sample(n):
        on = torch.rand(n, len(p), generator=g) < p
        return SparseCode(torch.arange(len(p)).expand(n, -1), on.float(), len(p))

    rates = latent_rates(sample(200_000))
    torch.testing.assert_close(rates, p.double(), atol=2e-3, rtol=0.1)
    assert latent_rates(_code([[0, 1], [0, 2]], [[1, 0], [1, 1]])).tolist() == [1.0, 0.0, 0.5] + [0.0] * 7
    n = 300
    want = float(((1 - p.double()) ** n).mean())
    assert dead_expected(rates, n) == pytest.approx(want, abs=0.005)
    measured = np.mean([dead_fraction(sample(n)) for _ in range(200)])
    assert measured == pytest.approx(dead_expected(rates, n), abs=0.01)
    # a latent that never fired is expected dead in any sample; one that always fires never is
    assert dead_expected(torch.tensor([0.0, 1.0]), 5) == pytest.approx(0.5)


def test_retrieval_scores_are_tie_pessimistic():
    s = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.6], [0.2, 0.2, 0.2]])
    r = retrieval_scores(s)
    # ranks: query 0 -> 1, query 1 -> 3, query 2 -> 3 (ties count against it)
    assert r["R@1"] == pytest.approx(1 / 3)
    assert r["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert r["R@5"] == 1.0


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="learning_rat: unknown key"):
        build_config(TrainConfig, {"learning_rat": 1})
    with pytest.raises(ConfigError, match="k=90 is larger than n_latents=64"):
        build_config(TrainConfig, {"k": 90, "n_latents": 64})
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nfeatures:\n  a: x.npy\n  b: y.npy\n")
    cfg = build_config(TrainConfig, load_config_file(p), str(p))
    assert cfg.steps == 5 and cfg.features == {"a": "x.npy", "b": "y.npy"}
    p.write_text("steps: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(p)
    with pytest.raises(ValueError, match="need at least 2 streams"):
        TrainConfig().model_config_for({"only": 3})


def test_model_settings_have_one_default_and_nest_in_the_training_config():
    from sparc_core import SparcConfig
    from sparc_core.config import ModelSettings

    bare = SparcConfig(streams={"a": 4, "b": 4})
    run = TrainConfig()
    # one source of truth: a bare model and a training run agree on every model default
    assert run.model.model_dump() == ModelSettings().model_dump() == bare.model_dump(exclude={"streams"})
    # flat keys (flags, old config files) land in the nested settings
    flat = TrainConfig(n_latents=128, k=8, min_rel_activation=0.3)
    assert (flat.model.n_latents, flat.model.k, flat.model.min_rel_activation) == (128, 8, 0.3)
    assert flat.model_config_for({"a": 4, "b": 4}).min_rel_activation == 0.3
    with pytest.raises(Exception, match="both flat and under model"):
        TrainConfig(k=8, model={"k": 16})


def test_min_rel_activation_has_a_train_flag(tmp_path):
    import argparse

    from sparc_core.cli import _add_train, train_config_from_args

    parser = argparse.ArgumentParser()
    _add_train(parser.add_subparsers())
    args = parser.parse_args(["train", "--features", "a=x.npy", "--features", "b=y.npy", "--min-rel-activation", "0.4"])
    assert train_config_from_args(args).model.min_rel_activation == 0.4
