"""Synthetic sparse codes with a realistic, skewed latent-frequency distribution (for index benchmarks).

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
