"""Sparse latent search: an inverted index over latents (posting lists of item, value).

Memory is k * (4 + 4) bytes per item (int32 item number + float32 value per active latent), never a dense
[n_items, n_latents] matrix. Scoring a query touches only the posting lists of its k latents.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


class SearchStopped(RuntimeError):
    """A search stopped early because its caller asked (deadline passed, call cancelled)."""


class Postings:
    """CSR-by-latent posting lists: for latent j, items[offsets[j]:offsets[j+1]] and their values."""

    def __init__(self, offsets: np.ndarray, items: np.ndarray, values: np.ndarray, n_items: int) -> None:
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.items = np.ascontiguousarray(items, dtype=np.int32)
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.n_items = int(n_items)
        with warnings.catch_warnings():  # memory-mapped, read-only: torch only ever reads these
            warnings.simplefilter("ignore", UserWarning)
            self._items_t = torch.from_numpy(self.items)
            self._values_t = torch.from_numpy(self.values)

    @property
    def n_latents(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_codes(cls, indices: np.ndarray, values: np.ndarray, n_latents: int, first_item: int = 0) -> Postings:
        """Build from item codes [n, k] (indices, values); only active (value > 0) entries are kept."""
        n, k = indices.shape
        active = values > 0
        lat = indices[active].astype(np.int64)
        item = np.broadcast_to(np.arange(first_item, first_item + n, dtype=np.int32)[:, None], (n, k))[active]
        val = values[active]
        order = np.argsort(lat, kind="stable")  # stable: items stay ascending inside each list
        counts = np.bincount(lat, minlength=n_latents)
        offsets = np.zeros(n_latents + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(offsets, item[order], val[order], first_item + n)

    def posting(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """Items (row numbers) and values of one latent's posting list."""
        a, b = self.offsets[latent], self.offsets[latent + 1]
        return self.items[a:b], self.values[a:b]

    def nbytes(self) -> int:
        return self.offsets.nbytes + self.items.nbytes + self.values.nbytes

    def _items_of(self, latents: list[int]) -> torch.Tensor:
        parts = [self._items_t[self.offsets[j] : self.offsets[j + 1]] for j in latents]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)

    def _search_one(
        self,
        lat: np.ndarray,
        w: np.ndarray,
        k: int,
        scores: torch.Tensor,
        require: list[int] | None = None,
        exclude: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One query (its active latents and weights): scores over its posting lists, then the top-k.

        ``scores`` is all zero on entry and is left all zero. With ``require`` only items active on every
        required latent are candidates (the intersection of those posting lists, so a rare latent makes
        the search cheaper, not dearer); items of ``exclude`` (the items of the excluded latents) never are.
        """
        starts, ends = self.offsets[lat], self.offsets[lat + 1]
        touched = False
        for a, b, wj in zip(starts.tolist(), ends.tolist(), w.tolist()):
            if b > a:
                scores.index_add_(0, self._items_t[a:b], self._values_t[a:b], alpha=wj)
                touched = True
        empty = np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        if not touched:
            return empty
        if exclude is not None and len(exclude):
            scores.index_fill_(0, exclude, 0.0)  # score 0 is "no hit"
        if require:
            cand = _intersect([self._items_t[self.offsets[j] : self.offsets[j + 1]] for j in require])
            vals = scores[cand]
            scores.zero_()
            top = vals.topk(min(k, len(cand))) if len(cand) else None
            if top is None:
                return empty
            return top.values.numpy(), cand[top.indices].numpy().astype(np.int64)
        top = scores.topk(min(k, self.n_items))  # one pass over the buffer beats gathering touched items
        scores.zero_()
        return top.values.numpy(), top.indices.numpy().astype(np.int64)

    def search(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        threads: int | None = None,
        require: list[int] | None = None,
        exclude: list[int] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k inner products <query code, item code>. q_idx, q_val: [nq, kq] -> (D, I) [nq, k].

        Each query accumulates its posting lists into a dense score buffer (index_add_ with the query
        weight as alpha, no temporaries) and takes its top-k. Large batches over large galleries run
        on worker threads (torch releases the GIL). Items sharing no active latent with the query are
        not hits: fewer than k hits leave I = -1, D = -inf. ``require`` / ``exclude``: latents a hit must /
        must not have active, applied inside the search. ``should_stop`` is polled between queries; once
        true the search raises SearchStopped.
        """
        nq = q_idx.shape[0]
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or k == 0 or self.n_items == 0:
            return D, I
        active = q_val > 0
        excluded = self._items_of(sorted(set(exclude))).long() if exclude else None
        required = sorted(set(require)) if require else None
        stopped = False

        def run(rows: range) -> None:
            nonlocal stopped
            scores = torch.zeros(self.n_items, dtype=torch.float32)
            for r in rows:
                if stopped or (should_stop is not None and should_stop()):
                    stopped = True
                    return
                d, i = self._search_one(q_idx[r][active[r]], q_val[r][active[r]], k, scores, required, excluded)
                hit = d > 0
                m = int(hit.sum())
                D[r, :m], I[r, :m] = d[hit], i[hit]

        threads = min(nq, threads or torch.get_num_threads())
        if threads <= 1 or nq * self.n_items < 16 * 200_000:  # small work: threads cost more than they give
            run(range(nq))
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, [range(t, nq, threads) for t in range(threads)]))
        if stopped:
            raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
        return D, I


def _intersect(lists: list[torch.Tensor]) -> torch.Tensor:
    """Items present in every posting list (each list holds an item at most once), ascending."""
    lists = sorted(lists, key=len)
    out = lists[0].long()
    for other in lists[1:]:
        if not len(out):
            break
        out = out[torch.from_numpy(np.isin(out.numpy(), other.numpy(), assume_unique=True))]
    return torch.sort(out).values
