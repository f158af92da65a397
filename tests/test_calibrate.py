"""Per-stream latent thresholds: the F1 rule on hand-made entries, and calibration of a real model."""

from __future__ import annotations

import numpy as np
import torch

from sparc_core import SparcConfig, SparcModel
from sparc_core.calibrate import NEVER, calibrate, f1_thresholds


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


def test_calibration_keeps_shared_latents_and_silences_one_stream_noise():
    # Two streams see the same 8 concepts through their own mixing; stream b also carries strong noise
    # in its own subspace. A model whose latents 0..7 read the concepts and 8..15 read b's noise (and,
    # in a, nothing) must end with 0..7 firing in both streams and 8..15 firing in neither.
    g = np.random.default_rng(0)
    n, d = 4000, 32
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
    feats = {"a": xa.astype(np.float32), "b": xb.astype(np.float32)}
    before = model.encode({"b": torch.from_numpy(feats["b"])})
    assert (before.indices[before.active] >= 8).float().mean() > 0.3  # noise latents fire in b
    calibrate(model, feats)
    for s, x in feats.items():
        code = model.encode({s: torch.from_numpy(x)})
        fired = code.indices[code.active]
        assert (fired >= 8).sum() == 0, s  # no support in the other stream: silenced
        on = torch.zeros(n, 16, dtype=torch.bool).scatter(1, code.indices, code.active)[:, :8].numpy()
        assert (on == (conc > 0)).mean() > 0.97, s  # the shared concepts fire where they are present
