"""Sparse kernels: encoder logits at k chosen latents and k-sparse decoding, O(k*d) per row with gradients.

Both have a dense reference (``*_dense``) used by the parity tests and by the dense-decoding variant.
They run on any device torch runs on; nothing here needs Triton or CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BAG_GRAD_RATIO = 4  # CPU, d 768-1024: the latent-sorted bags beat scatter + GEMM while N > 4 * columns (measured)


def _scatter_outer(idx: Tensor, g: Tensor, x: Tensor, n_latents: int) -> Tensor:
    """sum_b sum_j g[b, j] * outer(e_{idx[b, j]}, x[b]) -> [n_latents, d], i.e. G^T x for a k-sparse G.

    The entries are sorted by latent and each latent's rows of x summed with their weights in one
    embedding_bag over n_latents bags: O(B*k*d) reads of x (which stays in cache), and the output
    is written once, with no [B, N] scatter and no [B, N] x [B, d] GEMM. When the columns are a large
    share of N (measured crossover near N/4 on CPU), the dense scatter + GEMM is faster.
    """
    B, k = idx.shape
    if BAG_GRAD_RATIO * k < n_latents:
        flat = idx.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=n_latents)
        offsets = counts.cumsum(0) - counts
        rows = torch.div(order, k, rounding_mode="floor")
        weights = g.reshape(-1)[order].to(x.dtype)
        return F.embedding_bag(rows, x, offsets, mode="sum", per_sample_weights=weights)
    G = g.new_zeros(B, n_latents).scatter_add_(1, idx, g)
    return G.T @ x


class _GatherLogits(torch.autograd.Function):
    """``logits.gather(1, idx)`` where ``logits = (x - b_dec) @ W_enc.T + b_enc`` was computed without a graph.

    The backward touches only the gathered entries: dW_enc[i] += g * (x - b_dec) for each chosen latent i,
    so it costs O(B*k*d) instead of the O(B*n_latents*d) of a dense matmul. The b_dec gradient needs no
    per-row work: it is -(sum of g per latent) @ W_enc, the b_enc gradient times W_enc.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, b_dec, W_enc, idx)
        ctx.n_latents = b_enc.shape[0]
        return logits.gather(1, idx)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, b_dec, W_enc, idx = ctx.saved_tensors
        g = g.contiguous()
        grad_x = grad_b_dec = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = F.embedding_bag(idx, W_enc, per_sample_weights=g.to(W_enc.dtype), mode="sum")
        if ctx.needs_input_grad[3]:
            grad_W = _scatter_outer(idx, g, x - b_dec, ctx.n_latents).to(W_enc.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            per_latent = torch.zeros(ctx.n_latents, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
            grad_b = per_latent if ctx.needs_input_grad[4] else None
            if ctx.needs_input_grad[2]:
                grad_b_dec = -(per_latent.to(W_enc.dtype) @ W_enc)
        return None, grad_x, grad_b_dec, grad_W, grad_b, None


def gather_logits(logits: Tensor, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """Encoder logits at ``idx`` [B, k] with gradients to x, b_dec, W_enc, b_enc; ``logits`` is a no-grad [B, N]."""
    return _GatherLogits.apply(logits, x, b_dec, W_enc, b_enc, idx)


def gather_logits_dense(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """Reference: the full logits matmul with autograd, then gather."""
    return F.linear(x - b_dec, W_enc, b_enc).gather(1, idx)


def sparse_decode(idx: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j values[:, j] * W_dec[idx[:, j]] -> [B, d]; O(k*d) per row (embedding_bag)."""
    if idx.shape[1] == 0:
        return values.new_zeros(idx.shape[0], W_dec.shape[1])
    return F.embedding_bag(idx, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def sparse_decode_many(parts: list[tuple[Tensor, Tensor]], W_dec: Tensor) -> list[Tensor]:
    """Decode several codes (of any widths) by the same decoder in ONE embedding_bag call.

    One call means one dense gradient for W_dec instead of one per code, which is what keeps the
    backward of a multi-stream step cheap. parts: [(idx [B_i, k_i], values [B_i, k_i])] -> [[B_i, d]].
    """
    flat_idx = torch.cat([i.reshape(-1) for i, _ in parts])
    flat_val = torch.cat([v.reshape(-1) for _, v in parts]).to(W_dec.dtype)
    offsets, base = [], 0
    for i, _ in parts:
        offsets.append(torch.arange(i.shape[0], device=i.device) * i.shape[1] + base)
        base += i.numel()
    out = F.embedding_bag(flat_idx, W_dec, torch.cat(offsets), mode="sum", per_sample_weights=flat_val)
    return list(out.split([i.shape[0] for i, _ in parts]))


COMPACT_DECODE_RATIO = 8  # CPU, d 1024, k 256: the GEMM over m columns wins up to m ~ 9k (measured), bags beyond


def use_compact_decode(columns: Tensor, pos: Tensor) -> bool:
    """Whether codes confined to ``columns`` (e.g. the dead latents, for AuxK) decode faster as one small GEMM."""
    return columns.numel() <= COMPACT_DECODE_RATIO * pos.shape[1]


class _CompactDecode(torch.autograd.Function):
    """[B, m] code over ``columns`` times those m decoder rows; W_dec's gradient comes back sparse (m rows)."""

    @staticmethod
    def forward(ctx, columns: Tensor, pos: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:  # type: ignore[override]
        rows = W_dec.index_select(0, columns)
        dense = values.new_zeros(pos.shape[0], columns.numel()).scatter_(1, pos, values.to(W_dec.dtype))
        ctx.save_for_backward(columns, pos, dense, rows)
        ctx.shape = W_dec.shape
        return dense @ rows

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        columns, pos, dense, rows = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[2]:
            grad_values = (g @ rows.T).gather(1, pos)
        if ctx.needs_input_grad[3]:
            # Sparse: autograd adds the m rows into the dense gradient of the other decodes, no [N, d] zero-fill.
            grad_W = torch.sparse_coo_tensor(
                columns.unsqueeze(0), dense.T @ g, ctx.shape, is_coalesced=True, check_invariants=False
            )
        return None, None, grad_values, grad_W


def compact_decode(columns: Tensor, pos: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Decode codes whose latents all lie in ``columns`` [m] (sorted, unique): ``pos`` [B, k] indexes into them.

    The code is scattered into [B, m] and multiplied by the m decoder rows: O(m*d) per row with GEMM
    efficiency, against O(k*d) per row of memory-bound gathers for ``sparse_decode``; for AuxK codes
    (k of the m dead latents) the GEMM wins while m is below ~8k.
    """
    return _CompactDecode.apply(columns, pos, values, W_dec)


def dense_decode(idx: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Reference: scatter the code into [B, N] and multiply by the whole decoder."""
    dense = values.new_zeros(idx.shape[0], W_dec.shape[0]).scatter(1, idx, values)
    return dense @ W_dec
