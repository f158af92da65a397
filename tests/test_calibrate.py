"""Per-stream latent thresholds: the F1 rule on hand-made entries, and calibration of a real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparc_core import SparcConfig, SparcModel
from sparc_core.calibrate import NEVER, calibrate, choose_soft_weight, f1_thresholds


def test_f1_threshold_separates_supported_from_unsupported_firing():
    # latent 0: strong values are backed by the other streams, weak ones are not -> threshold between
    # latent 1: never backed -> never fires; latent 2: no entries at all -> never fires
    lats = np.array([0, 0, 0, 0, 0, 1, 1])
    vals = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.5, 0.4], dtype=np.float32)
    target = np.array([1, 1, 1, 0, 0, 0, 0], dtype=np.float64)
    positives = np.array([3.0, 0.0, 0.0])
    th = f1_thresholds(lats, vals, target, positives)
    assert th[0] == np.float32(0.7)
    assert th[1] == NEVER and th[2] == NEVER
    # support the other streams have where this stream has no entry lowers the best F1, not the cut
    th = f1_thresholds(lats, vals, target, np.array([6.0, 0.0, 0.0]))
    assert th[0] == np.float32(0.7)
    # soft targets (half of the other streams agree) count half
    th = f1_thresholds(np.array([0, 0]), np.array([0.9, 0.3], dtype=np.float32), np.array([0.5, 0.5]), np.array([1.0]))
    assert th[0] == np.float32(0.3)


def _concepts_and_noise(n: int = 4000, d: int = 32) -> tuple[SparcModel, dict[str, np.ndarray], np.ndarray]:
    """Two streams see the same 8 concepts through their own mixing; stream b also carries strong noise in
    its own subspace. The model's latents 0..7 read the concepts and 8..15 read b's noise (in a, nothing)."""
    g = np.random.default_rng(0)
    conc = (g.random((n, 8)) < 0.3) * g.uniform(0.5, 1.5, (n, 8))
    Ma, Mb = np.linalg.qr(g.standard_normal((d, d)))[0], np.linalg.qr(g.standard_normal((d, d)))[0]
    xa = conc @ Ma[:8]
    noise = np.abs(g.standard_normal((n, 8))) * (g.random((n, 8)) < 0.5)
    xb = conc @ Mb[:8] + noise @ Mb[8:16]
    model = SparcModel(SparcConfig(streams={"a": d, "b": d}, n_latents=16, k=8, input_norm="none", private_latents=0))
    with torch.no_grad():
        for s, M in (("a", Ma), ("b", Mb)):
            c = model.codecs[s]
            c.b_dec.zero_()
            c.b_enc.zero_()
            c.W_enc.copy_(torch.from_numpy(np.concatenate([M[:8], M[8:16]])).float())
            c.W_dec.copy_(c.W_enc)
    return model, {"a": xa.astype(np.float32), "b": xb.astype(np.float32)}, conc


def test_calibration_keeps_shared_latents_and_silences_one_stream_noise():
    # After calibration latents 0..7 must fire in both streams and 8..15 in neither (the agreed code).
    model, feats, conc = _concepts_and_noise()
    n = len(conc)
    before = model.encode({"b": torch.from_numpy(feats["b"])})
    assert (before.indices[before.active] >= 8).float().mean() > 0.3  # noise latents fire in b
    calibrate(model, feats)
    for s, x in feats.items():
        code = model.encode({s: torch.from_numpy(x)}, code="agreed")
        fired = code.indices[code.active]
        assert (fired >= 8).sum() == 0, s  # no support in the other stream: silenced
        on = torch.zeros(n, 16, dtype=torch.bool).scatter(1, code.indices, code.active)[:, :8].numpy()
        assert (on == (conc > 0)).mean() > 0.97, s  # the shared concepts fire where they are present


def test_the_three_codes_share_indices_and_differ_only_by_the_soft_weight():
    model, feats, _ = _concepts_and_noise(n=500)
    calibrate(model, feats)
    x = torch.from_numpy(feats["b"])
    model.set_soft_weight(0.3)
    full, agreed, search = (model.encode({"b": x}, code=c) for c in ("full", "agreed", "search"))
    assert torch.equal(full.indices, agreed.indices) and torch.equal(full.indices, search.indices)
    top = model.logits("b", x).topk(model.k, dim=1, sorted=False)
    torch.testing.assert_close(full.values, top.values.relu())
    passed = full.values >= model.codecs["b"].threshold[full.indices]
    assert passed.any() and (~passed & (full.values > 0)).any()  # both kinds of latents are present
    torch.testing.assert_close(agreed.values, full.values * passed)
    torch.testing.assert_close(search.values, torch.where(passed, full.values, 0.3 * full.values))
    model.set_soft_weight(0.0)
    torch.testing.assert_close(model.encode({"b": x}).values, agreed.values)  # the dial's ends
    model.set_soft_weight(1.0)
    torch.testing.assert_close(model.encode({"b": x}).values, full.values)
    with pytest.raises(ValueError, match="soft_weight"):
        model.set_soft_weight(1.5)
    with pytest.raises(ValueError, match="code must be one of"):
        model.encode({"b": x}, code="dense")


def test_soft_weight_is_the_grid_point_that_retrieves_best_by_brute_force():
    # choose_soft_weight scores every weight from a few products; recompute each one from scratch.
    model, feats, _ = _concepts_and_noise(n=600)
    calibrate(model, feats)
    grid = (0.0, 0.25, 0.5, 1.0)
    chosen, scores = choose_soft_weight(model, feats, rows=400, grid=grid)
    assert model.soft_weight == chosen  # the winner is left set on the model
    for w in grid:
        model.set_soft_weight(w)
        codes = {s: model.encode({s: torch.from_numpy(x[:400])}) for s, x in feats.items()}
        unit = {s: torch.nn.functional.normalize(c.to_dense(), dim=1) for s, c in codes.items()}
        recalls = []
        for s, t in (("a", "b"), ("b", "a")):
            sim = unit[s] @ unit[t].T
            recalls.append(float(((sim >= sim.diagonal().unsqueeze(1) - 1e-6).sum(1) == 1).float().mean()))
        assert abs(scores[w] - np.mean(recalls)) <= 0.01, (w, scores[w], recalls)
    assert scores[chosen] == max(scores.values()) and chosen == min(w for w in grid if scores[w] == scores[chosen])
    # stream b's unagreed latents are its own noise: adding them back can only hurt retrieval here
    assert scores[1.0] < scores[0.0], scores


def test_calibration_leaves_the_served_code_at_the_weight_that_retrieves_best():
    # guard: a calibration that left the soft weight at 1 (the plain top-k code) or silenced every latent
    # must fail here, not pass because the served code equals the plain one
    model, feats, conc = _concepts_and_noise(n=600)
    calibrate(model, feats)
    left = model.soft_weight  # what calibrate set (stored as float32)
    _, scores = choose_soft_weight(model, feats, rows=600)
    chosen = min(scores, key=lambda w: abs(w - left))
    assert chosen < 1.0 and scores[chosen] > scores[1.0] + 0.05, (chosen, scores)
    agreed = {s: model.encode({s: torch.from_numpy(x)}, code="agreed") for s, x in feats.items()}
    no_concept = float((conc.sum(1) == 0).mean())  # rows holding no concept have nothing to agree on
    assert all(float((c.l0() == 0).float().mean()) <= no_concept + 0.02 for c in agreed.values()), no_concept
