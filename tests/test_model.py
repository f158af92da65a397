"""SparcModel: Global/Local TopK, the one-stream path, decoder geometry, sparse vs dense kernels."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sparc_core import SparcConfig, SparcModel, SparseCode, kernels
from sparc_core.kernels import dense_decode, gather_logits, gather_logits_dense, sparse_decode, sparse_decode_many

from .conftest import STREAMS


def test_global_topk_selects_identical_indices_across_streams(small_model, batch):
    codes = small_model.encode_streams(batch)
    first = next(iter(codes.values())).indices
    for code in codes.values():
        assert torch.equal(code.indices, first)
    # ... and they are the top-k of the SUMMED logits, each stream keeping its own values.
    total = sum(small_model.logits(s, x) for s, x in batch.items())
    expected = total.topk(small_model.k, dim=1).indices.sort(1).values
    assert torch.equal(first.sort(1).values, expected)
    for s, code in codes.items():
        raw = small_model.logits(s, batch[s]).gather(1, code.indices).relu()
        floor = small_model.cfg.min_rel_activation * raw.amax(1, keepdim=True)
        assert_close(code.values, torch.where(raw >= floor, raw, 0.0))


def test_local_topk_selects_per_stream(small_cfg, batch):
    model = SparcModel(small_cfg.model_copy(update={"topk": "local"}), seed=3)
    codes = model.encode_streams(batch)
    for s, code in codes.items():
        expected = model.logits(s, batch[s]).topk(model.k, dim=1).indices.sort(1).values
        assert torch.equal(code.indices.sort(1).values, expected)
    assert not torch.equal(codes["dino"].indices.sort(1).values, codes["clip_txt"].indices.sort(1).values)
    with pytest.raises(ValueError, match="Local-TopK"):
        model.encode(batch)


def test_one_stream_encode_is_its_own_topk(small_model, batch):
    code = small_model.encode({"clip_txt": batch["clip_txt"]})
    assert isinstance(code, SparseCode)
    assert code.indices.shape == (20, small_model.k) and code.values.shape == (20, small_model.k)
    assert code.to_dense().shape == (20, small_model.n_latents)
    h = small_model.logits("clip_txt", batch["clip_txt"])
    assert torch.equal(code.indices.sort(1).values, h.topk(small_model.k, dim=1).indices.sort(1).values)
    assert (code.values >= 0).all()
    # The dense form holds exactly the k values at the k indices.
    dense = code.to_dense()
    assert_close(dense.gather(1, code.indices), code.values)
    assert int((dense != 0).sum()) == int((code.values != 0).sum())


def test_joint_encode_averages_stream_values(small_model, batch):
    joint = small_model.encode(batch)
    per = small_model.encode_streams(batch)
    assert_close(joint.values, torch.stack([c.values for c in per.values()]).mean(0))


def test_decode_values_and_errors(small_model, batch):
    code = small_model.encode({"dino": batch["dino"]})
    z = code.to_dense()
    for s, d in STREAMS.items():
        c = small_model.codecs[s]
        # W_dec^T z + b_dec, with the stream's input transform undone (default space) or not
        normalized = z @ c.W_dec + c.b_dec
        assert_close(small_model.decode(code, s, "normalized"), normalized, rtol=1e-5, atol=1e-5)
        assert_close(small_model.decode(code, s), normalized / c.input_scale, rtol=1e-5, atol=1e-5)
        assert small_model.decode(code, s).shape == (20, d)
    with pytest.raises(KeyError, match="unknown stream"):
        small_model.decode(code, "audio")
    with pytest.raises(ValueError, match=r"expects input of shape \[n, 16\]"):
        small_model.encode({"clip_txt": torch.randn(3, 5)})
    with pytest.raises(KeyError, match="unknown stream 'audio'"):
        small_model.encode({"audio": torch.randn(3, 5)})
    with pytest.raises(ValueError, match="at least one stream"):
        small_model.encode({})


@pytest.mark.parametrize("n_streams", [2, 4])
def test_any_number_of_streams_and_names(n_streams):
    streams = {f"s{i}_x": 8 + i for i in range(n_streams)}
    model = SparcModel(SparcConfig(streams=streams, n_latents=32, k=4, auxk=4))
    x = {s: torch.randn(5, d) for s, d in streams.items()}
    out = model(x, dead={s: torch.ones(32, dtype=torch.bool) for s in streams})
    (out.self_loss + out.cross_loss + out.auxk_loss + out.align_loss).backward()
    assert set(out.codes) == set(streams)
    assert all(p.grad is not None for p in model.parameters())


def test_decoder_rows_stay_unit_norm_after_steps(small_model, batch):
    small_model.set_decoder_norm_to_unit_norm()
    opt = torch.optim.Adam(small_model.parameters(), lr=1e-2)
    for _ in range(5):
        out = small_model(batch)
        opt.zero_grad()
        (out.self_loss + out.cross_loss + out.align_loss).backward()
        small_model.remove_gradient_parallel_to_decoder_directions()
        for c in small_model.codecs.values():  # the projected gradient is orthogonal to each row
            assert_close((c.W_dec.grad * c.W_dec).sum(1), torch.zeros(c.W_dec.shape[0]), atol=1e-6, rtol=0)
        opt.step()
        small_model.set_decoder_norm_to_unit_norm()
    for c in small_model.codecs.values():
        assert_close(c.W_dec.norm(dim=1), torch.ones(c.W_dec.shape[0]))


def test_decoder_initialised_as_encoder_transpose(small_model):
    for c in small_model.codecs.values():
        assert_close(c.W_dec, c.W_enc / c.W_enc.norm(dim=1, keepdim=True))


def _grads(model: SparcModel, batch, dead):
    out = model(batch, dead=dead, alone_select=torch.tensor([0, 1, 2, -1] * 5))
    loss = out.self_loss + 0.7 * out.cross_loss + 0.3 * out.auxk_loss + 0.5 * out.align_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("compact_ratio", [16, 0])  # AuxK decoded by the compact GEMM / by embedding_bag
@pytest.mark.parametrize("bag_ratio", [4, 0])  # encoder gradient by scatter + GEMM / by latent-sorted bags
def test_sparse_kernels_match_dense_reference_values_and_gradients(small_cfg, batch, compact_ratio, bag_ratio, monkeypatch):
    monkeypatch.setattr(kernels, "COMPACT_DECODE_RATIO", compact_ratio)
    monkeypatch.setattr(kernels, "BAG_GRAD_RATIO", bag_ratio)
    dead = {s: torch.arange(small_cfg.n_latents) % 3 == i for i, s in enumerate(STREAMS)}
    sparse = SparcModel(small_cfg, seed=5)
    dense = SparcModel(small_cfg.model_copy(update={"sparse_kernels": False}), seed=5)
    loss_s, grads_s = _grads(sparse, batch, dead)
    loss_d, grads_d = _grads(dense, batch, dead)
    assert_close(loss_s, loss_d)
    for name in grads_d:
        assert_close(grads_s[name], grads_d[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "k,n_latents,repeats",
    [(1, 128, 0), (9, 128, 0), (9, 128, 4), (40, 64, 0), (40, 64, 7)],  # latent-sorted bags / dense scatter + GEMM
)
def test_gather_logits_kernel_matches_autograd(k, n_latents, repeats):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(7, 10, generator=g, requires_grad=True)
    b_dec = torch.randn(10, generator=g, requires_grad=True)
    W = torch.randn(n_latents, 10, generator=g, requires_grad=True)
    b = torch.randn(n_latents, generator=g, requires_grad=True)
    idx = torch.rand(7, n_latents, generator=g).topk(k, dim=1).indices
    idx = torch.cat([idx, idx[:, :repeats]], dim=1)  # a latent read twice in a row (shared and one-stream sets)
    k = idx.shape[1]
    w = torch.randn(7, k, generator=g)
    ref = gather_logits_dense(x, b_dec, W, b, idx)
    grads_ref = torch.autograd.grad((ref * w).sum(), (x, b_dec, W, b))
    with torch.no_grad():
        logits = torch.nn.functional.linear(x - b_dec, W, b)
    out = gather_logits(logits, x, b_dec, W, b, idx)
    grads = torch.autograd.grad((out * w).sum(), (x, b_dec, W, b))
    assert_close(out, ref)
    for a, r in zip(grads, grads_ref):
        assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_compact_decode_matches_dense_decode_with_gradients():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 6, generator=g, requires_grad=True)
    columns = torch.tensor([3, 7, 8, 20, 33, 39])
    pos = torch.rand(5, 6, generator=g).topk(3, dim=1).indices
    v = torch.rand(5, 3, generator=g, requires_grad=True)
    out = kernels.compact_decode(columns, pos, v, W)
    ref = dense_decode(columns[pos], v, W)
    assert_close(out, ref)
    w = torch.randn(5, 6, generator=g)
    for a, r in zip(torch.autograd.grad((out * w).sum(), (v, W)), torch.autograd.grad((ref * w).sum(), (v, W))):
        assert_close(a.to_dense() if a.is_sparse else a, r)
    assert kernels.use_compact_decode(columns, pos) and not kernels.use_compact_decode(torch.arange(49), pos)


def test_sparse_decode_matches_dense_decode_with_gradients():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 9, generator=g, requires_grad=True)
    parts = []
    for rows, k in ((4, 3), (6, 7)):
        idx = torch.rand(rows, 50, generator=g).topk(k, dim=1).indices
        parts.append((idx, torch.rand(rows, k, generator=g).requires_grad_()))
    many = sparse_decode_many(parts, W)
    for (idx, v), out in zip(parts, many):
        assert_close(out, dense_decode(idx, v, W))
        assert_close(sparse_decode(idx, v, W), dense_decode(idx, v, W))
    loss_sparse = sum((o**2).sum() for o in many)
    gs = torch.autograd.grad(loss_sparse, [W] + [v for _, v in parts])
    loss_dense = sum((dense_decode(i, v, W) ** 2).sum() for i, v in parts)
    gd = torch.autograd.grad(loss_dense, [W] + [v for _, v in parts])
    for a, b in zip(gs, gd):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_input_normalisation_is_stored_and_applied(small_cfg):
    model = SparcModel(small_cfg)
    sample = {s: torch.randn(100, d) * (50.0 if s == "dino" else 1.0) for s, d in STREAMS.items()}
    model.fit_input_norm(sample)
    normed = model.normalize("dino", sample["dino"])
    assert normed.norm(dim=1).mean().item() == pytest.approx(1.0, rel=1e-4)
    # scaling a stream's inputs changes nothing after l2 normalisation
    l2 = SparcModel(small_cfg.model_copy(update={"input_norm": "l2"}))
    x = torch.randn(4, 24)
    assert torch.equal(l2.encode({"dino": x}).indices, l2.encode({"dino": 30 * x}).indices)


def test_decode_returns_the_streams_own_feature_space(small_cfg, batch):
    model = SparcModel(small_cfg.model_copy(update={"input_norm": "scale"}), seed=3)
    raw = {s: 40.0 * x / x.norm(dim=1, keepdim=True) for s, x in batch.items()}  # rows of norm 40, as DINO
    model.fit_input_norm(raw)
    for s, x in raw.items():
        code = model.encode({s: x})
        normalized = model.decode(code, s, "normalized").detach()
        own = model.decode(code, s).detach()
        # the default undoes the stored input transform: the reconstruction lives at the input's scale
        assert_close(own, normalized / model.codecs[s].input_scale)
        assert float(own.norm(dim=1).mean()) == pytest.approx(40.0 * float(normalized.detach().norm(dim=1).mean()), rel=1e-4)
        assert 10.0 < float(own.norm(dim=1).mean()) < 80.0
    with pytest.raises(ValueError, match="space"):
        model.decode(code, s, "latent")


def test_an_anchored_alignment_moves_only_the_other_streams(small_model, batch):
    anchor = ("dino", "clip_img")  # two anchors: each would move towards their mean if they were pulled

    def align_grads(anchors: tuple[str, ...]) -> dict[str, float]:
        small_model.zero_grad()
        out = small_model(batch, align_anchor=anchors)
        out.align_loss.backward()
        return {s: 0.0 if c.W_enc.grad is None else float(c.W_enc.grad.abs().sum()) for s, c in small_model.codecs.items()}

    free, anchored = align_grads(()), align_grads(anchor)
    assert all(g > 0 for g in free.values()), free  # without anchors every stream is pulled
    assert anchored["dino"] == anchored["clip_img"] == 0.0 and anchored["clip_txt"] > 0, anchored
