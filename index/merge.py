"""The one top-k merge of the index (numpy only): a query's block ranges, a bundle's parts, a gallery's
shards and a search's galleries are all merged by ``merge_order``, with one tie rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def merge_order(
    scores: Sequence[np.ndarray], k: int, keys: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k merge, at every level (a query's block ranges, a bundle's parts, a gallery's shards, a
    search's galleries): per query, the ``k`` best entries of several sources' [nq, k_i] scores (-inf: no
    entry), as (scores, source, position in the source), each [nq, k].

    One tie rule: score descending; equal scores by ``keys`` ascending where the level has them (global rows;
    a negative key is no entry), then by source, then by position. Every source is itself in this order, so
    one level up (source, position) stands for the key: the order is the same whichever way results were cut.
    """
    if len(scores) == 1 and keys is None:  # one source is already in the tie order
        D = np.asarray(scores[0], dtype=np.float32)[:, :k]
        src, pos = np.zeros(D.shape, dtype=np.int64), np.broadcast_to(np.arange(D.shape[1]), D.shape)
        if D.shape[1] == k:
            return D, src, pos
        scores = [D]  # fewer than k: padded below
    D = np.concatenate([np.asarray(s, dtype=np.float32) for s in scores], axis=1)
    src = np.concatenate([np.full(np.shape(s), i, dtype=np.int64) for i, s in enumerate(scores)], axis=1)
    pos = np.concatenate([np.broadcast_to(np.arange(np.shape(s)[1]), np.shape(s)) for s in scores], axis=1)
    if keys is None:
        order = np.argsort(-D, axis=1, kind="stable")  # stable: source, then position
    else:
        K = np.concatenate([np.asarray(x, dtype=np.int64) for x in keys], axis=1)
        # a key (a row) appears once, so (score, key) already orders every entry but the missing ones
        order = np.lexsort((np.where(K < 0, np.iinfo(np.int64).max, K), -D), axis=1)
    order = order[:, :k]
    D, src, pos = (np.take_along_axis(a, order, 1) for a in (D, src, pos))
    if D.shape[1] < k:
        pad = ((0, 0), (0, k - D.shape[1]))
        D, src, pos = np.pad(D, pad, constant_values=-np.inf), np.pad(src, pad, constant_values=-1), np.pad(pos, pad)
    return D, src, pos
