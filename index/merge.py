"""The one top-k merge of the index (numpy only): a query's block ranges, a bundle's parts, a gallery's
shards and a search's galleries are all merged by ``merge_order``, with one tie rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def merge_order(scores: Sequence[np.ndarray], k: int, keys: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top-k merge, at every level (a query's block ranges, a bundle's parts, a gallery's shards, a
    search's galleries): per query, the ``k`` best entries of several sources' [nq, k_i] scores (-inf: no
    entry), as (scores [nq, k], at [nq, k]): ``at`` is the entry's column in the sources' concatenation
    (-1 past the last entry), so a caller gathers any payload concatenated the same way.

    One tie rule: score descending; equal scores by ``keys`` ascending where the level has them (global rows,
    each appearing once; a negative key is no entry), else by source, then by position. Every source is
    itself in this order, so one level up (source, position) stands for the key: the order is the same
    whichever way the results were cut.
    """
    if len(scores) == 1 and keys is None:  # one source is already in the tie order
        D = np.asarray(scores[0])[:, :k]
        order = np.broadcast_to(np.arange(D.shape[1]), D.shape)
    else:
        D = _joined(scores)
        if keys is None:
            order = np.argsort(-D, axis=1, kind="stable")[:, :k]  # stable: source, then position
        else:
            K = _joined(keys)
            order = np.lexsort((np.where(K < 0, np.iinfo(np.int64).max, K), -D), axis=1)[:, :k]
        D = np.take_along_axis(D, order, 1)
    if D.shape[1] < k:
        pad = ((0, 0), (0, k - D.shape[1]))
        D, order = np.pad(D, pad, constant_values=-np.inf), np.pad(order, pad, constant_values=-1)
    return D, order


def gather(payload: Sequence[np.ndarray], at: np.ndarray, fill: int = -1) -> np.ndarray:
    """The entries ``merge_order`` chose from payloads concatenated as its sources were ([nq, k_i] each);
    ``fill`` past the last entry."""
    out = np.take_along_axis(_joined(payload), np.maximum(at, 0), 1)
    return out if at.size == 0 or at.min() >= 0 else np.where(at >= 0, out, fill)


def _joined(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.asarray(arrays[0]) if len(arrays) == 1 else np.concatenate(arrays, axis=1)
