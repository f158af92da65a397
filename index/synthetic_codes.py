"""Synthetic sparse codes with a realistic, skewed latent-frequency distribution (index benchmarks and tests).

Latent firing rates are log-normal (sigma 1 by default: the median latent fires on ~0.5% of items, the
busiest on ~20%, as in trained SAEs' firing-rate histograms). Each item draws about ``l0`` latents in
proportion to those rates (duplicates merged, so L0 varies per item) and gets positive values, L2-normalised.
Queries come from the same distribution, so they favour the busy latents exactly as real queries do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def latent_probabilities(n_latents: int, sigma: float = 1.0, seed: int = 0) -> np.ndarray:
    """Per-latent draw probabilities (log-normal weights, normalised)."""
    w = np.exp(sigma * np.random.default_rng(seed).standard_normal(n_latents))
    return w / w.sum()


def sample_codes(n: int, k: int, p: np.ndarray, l0: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Codes [n, k]: latent ids (int16/int32) and float16 unit values; about ``l0`` (default k) active per row."""
    rng = np.random.default_rng(seed)
    l0 = l0 or k
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    extra = 4 + l0 // 8  # a few spare draws replace duplicates, so nearly every row has l0 distinct latents
    draws = rng.random((n, l0 + extra), dtype=np.float32)
    lat = np.minimum(np.searchsorted(cdf, draws), len(p) - 1).astype(np.int32)
    lat.sort(axis=1)
    dup = np.zeros_like(lat, dtype=bool)
    dup[:, 1:] = lat[:, 1:] == lat[:, :-1]
    first = np.argsort(dup, axis=1, kind="stable")[:, :l0]  # distinct latents first (in id order; rates are not)
    lat, dup = np.take_along_axis(lat, first, 1), np.take_along_axis(dup, first, 1)
    vals = (rng.random(lat.shape, dtype=np.float32) + 0.05) * ~dup
    vals /= np.linalg.norm(vals, axis=1, keepdims=True)
    lat[dup] = 0
    idx_dtype = np.int16 if len(p) <= np.iinfo(np.int16).max else np.int32
    idx = np.zeros((n, k), dtype=idx_dtype)
    val = np.zeros((n, k), dtype=np.float16)
    m = min(k, l0)
    idx[:, :m], val[:, :m] = lat[:, :m], vals[:, :m]
    return idx, val


def code_chunks(n: int, k: int, p: np.ndarray, chunk: int = 1 << 16, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``n`` codes in chunks (the same codes for the same seed and chunk size)."""
    for i, a in enumerate(range(0, n, chunk)):
        yield sample_codes(min(chunk, n - a), k, p, seed=seed * 1_000_003 + i)


def topic_codes(
    n: int, k: int, p: np.ndarray, n_topics: int, shared: float = 0.5, seed: int = 0, topic_seed: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Codes with structure: every item belongs to one of ``n_topics`` topics (scenes); ``shared`` of its
    latents are its topic's (drawn once per topic from the same skewed rates, values jittered per item),
    the rest its own draws. Queries drawn the same way have true neighbours (their topic's items) above a
    background of chance overlaps, as a caption has its image among unrelated ones."""
    rng = np.random.default_rng(seed)
    t_idx, t_val = sample_codes(n_topics, k, p, seed=topic_seed)
    own_idx, own_val = sample_codes(n, k, p, seed=seed + 1)
    topic = rng.integers(0, n_topics, n)
    m = int(round(k * shared))
    idx = np.concatenate([t_idx[topic, :m], own_idx[:, : k - m]], axis=1).astype(np.int32)
    val = np.concatenate([t_val[topic, :m] * rng.uniform(0.5, 1.5, (n, m)), own_val[:, : k - m]], axis=1)
    val = val.astype(np.float32)
    srt = np.sort(idx, axis=1)  # a latent both shared and own: keep one entry
    dup = np.zeros_like(idx, dtype=bool)
    order = np.argsort(idx, axis=1, kind="stable")
    dup_sorted = np.zeros_like(srt, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    val[dup] = 0
    val /= np.maximum(np.linalg.norm(val, axis=1, keepdims=True), 1e-12)
    idx[dup] = 0
    return idx.astype(np.int16 if len(p) <= np.iinfo(np.int16).max else np.int32), val.astype(np.float16)


def topic_chunks(
    n: int, k: int, p: np.ndarray, n_topics: int, chunk: int = 1 << 16, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``n`` topic codes in chunks (the same codes for the same seed and chunk size)."""
    for i, a in enumerate(range(0, n, chunk)):
        yield topic_codes(min(chunk, n - a), k, p, n_topics, seed=seed * 1_000_003 + i)
