"""Hooks into the vision and text towers (timm ViTs, open_clip's CLIP with a ViT or a ModifiedResNet image
tower): attention maps kept with their gradients, the tokens the last attention reads, and the input gradients
every method starts from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ...encoders import ClipImageEncoder, DinoEncoder, FeatureEncoder
from .targets import AttributionError


class _Recorder:
    """Attention probabilities of every block, kept with their gradients."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def keep(self, a: torch.Tensor) -> torch.Tensor:
        self.maps.append(a)
        return a


@contextlib.contextmanager
def _timm_attention(vit: Any, rec: _Recorder) -> Iterator[None]:
    """timm ViT blocks compute attention explicitly (not fused) and hand their probabilities to ``rec``."""
    saved, handles = [], []
    for blk in vit.blocks:
        attn = blk.attn
        saved.append((attn, attn.fused_attn))
        attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o: rec.keep(o)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for attn, fused in saved:
            attn.fused_attn = fused


def _explicit_mha(mha: torch.nn.MultiheadAttention, q_x, k_x, v_x, attn_mask, rec: _Recorder) -> torch.Tensor:
    """nn.MultiheadAttention (batch first) computed step by step, so its probabilities carry gradients."""
    b, lq, d = q_x.shape
    h = mha.num_heads
    hd = d // h
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    q = F.linear(q_x, wq, bq).view(b, lq, h, hd).transpose(1, 2)
    k = F.linear(k_x, wk, bk).view(b, k_x.shape[1], h, hd).transpose(1, 2)
    v = F.linear(v_x, wv, bv).view(b, v_x.shape[1], h, hd).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / hd**0.5
    if attn_mask is not None:
        mask = (
            attn_mask.to(scores.dtype)
            if attn_mask.dtype != torch.bool
            else torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
        )
        scores = scores + mask
    a = rec.keep(scores.softmax(-1))
    out = (a @ v).transpose(1, 2).reshape(b, lq, d)
    return mha.out_proj(out)


@contextlib.contextmanager
def _clip_attention(transformer: Any, rec: _Recorder) -> Iterator[None]:
    """open_clip residual blocks return their per-head attention weights to ``rec``."""
    patched = []
    for blk in transformer.resblocks:

        def attention(q_x, k_x=None, v_x=None, attn_mask=None, _blk=blk):
            return _explicit_mha(_blk.attn, q_x, q_x if k_x is None else k_x, q_x if v_x is None else v_x, attn_mask, rec)

        blk.attention = attention
        patched.append(blk)
    try:
        yield
    finally:
        for blk in patched:
            del blk.attention  # back to the class's method


@contextlib.contextmanager
def _resnet_attention(visual: Any, rec: _Recorder, store: dict) -> Iterator[None]:
    """A ModifiedResNet's attention pool (its one attention: the mean of layer4's grid, as a query, reads the
    grid) computed step by step: its probabilities go to ``rec``; ``store`` keeps layer4's grid with the mean
    token first ("normed", Grad-CAM's activations) and the same plus the positional embedding ("tokens", what
    the attention reads). The output is the pool's, unchanged."""
    pool = visual.attnpool

    def forward(x: torch.Tensor) -> torch.Tensor:
        grid = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        a = store["normed"] = torch.cat([grid.mean(1, keepdim=True), grid], 1)
        t = store["tokens"] = a + pool.positional_embedding[None].to(a.dtype)
        b, n, d = t.shape
        h = pool.num_heads
        q = pool.q_proj(t).view(b, n, h, d // h).transpose(1, 2)
        k = pool.k_proj(t).view(b, n, h, d // h).transpose(1, 2)
        v = pool.v_proj(t).view(b, n, h, d // h).transpose(1, 2)
        attn = rec.keep(((q @ k.transpose(-2, -1)) / (d // h) ** 0.5).softmax(-1))
        return pool.c_proj((attn @ v).transpose(1, 2).reshape(b, n, d)[:, 0])

    pool.forward = forward
    try:
        yield
    finally:
        del pool.forward  # back to the class's method


@contextlib.contextmanager
def _last_tokens(block: torch.nn.Module, norm: torch.nn.Module, store: dict) -> Iterator[None]:
    """Keep the tokens entering the last block (the class token reads the patches through that block's
    attention, so the patch tokens after it no longer reach the output), its first norm's output (Grad-CAM's
    activations) and its output."""

    def pre(module, inputs):
        store["tokens"] = inputs[0]

    def normed(module, inputs, output):
        store["normed"] = output

    def post(module, inputs, output):
        store["out"] = output

    hs = [block.register_forward_pre_hook(pre), norm.register_forward_hook(normed), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _input_grads(score: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d score / d each input (None where it does not depend on it); no parameter gets a ``.grad``."""
    wanted = [x for x in inputs if x.requires_grad]
    if not score.requires_grad or not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad(score, wanted, allow_unused=True))
    return [next(got) if x.requires_grad else None for x in inputs]


def _vision(encoder: FeatureEncoder) -> tuple[str, Any]:
    if isinstance(encoder, DinoEncoder):
        return "dino", encoder.model
    if isinstance(encoder, ClipImageEncoder):
        visual = encoder.clip.model.visual
        if hasattr(visual, "transformer"):
            return "clip", visual
        if hasattr(getattr(visual, "attnpool", None), "positional_embedding"):
            return "clip-resnet", visual  # open_clip's ModifiedResNet (the RN50 layout)
        raise AttributionError(
            f"{encoder.name}: heatmaps need a vision transformer or a ModifiedResNet with an attention pool "
            f"(this CLIP image tower, {type(visual).__name__}, is neither)"
        )
    raise AttributionError(f"stream {encoder.stream!r} ({encoder.name}) is not an image encoder")


def _grid(n_patches: int, pixels: torch.Tensor) -> tuple[int, int]:
    h, w = pixels.shape[-2:]
    for ph in range(1, n_patches + 1):
        if n_patches % ph == 0 and abs(ph / (n_patches // ph) - h / w) < 1e-6:
            return ph, n_patches // ph
    side = int(round(n_patches**0.5))
    return side, n_patches // side
