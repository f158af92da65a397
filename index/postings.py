"""Sparse latent search: an inverted index over latents (posting lists of item, value).

Memory is k * (4 + 4) bytes per item (int32 item number + float32 value per active latent), never a dense
[n_items, n_latents] matrix. Scoring a query touches only the posting lists of its k latents.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


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

    def _search_one(self, lat: np.ndarray, w: np.ndarray, k: int, scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One query (its active latents and weights): scores over its posting lists, then the top-k.

        ``scores`` is all zero on entry and is left all zero.
        """
        starts, ends = self.offsets[lat], self.offsets[lat + 1]
        touched = False
        for a, b, wj in zip(starts.tolist(), ends.tolist(), w.tolist()):
            if b > a:
                scores.index_add_(0, self._items_t[a:b], self._values_t[a:b], alpha=wj)
                touched = True
        if not touched:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        top = scores.topk(min(k, self.n_items))  # one pass over the buffer beats gathering touched items
        scores.zero_()
        return top.values.numpy(), top.indices.numpy().astype(np.int64)

    def search(self, q_idx: np.ndarray, q_val: np.ndarray, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k inner products <query code, item code>. q_idx, q_val: [nq, kq] -> (D, I) [nq, k].

        Each query accumulates its posting lists into a dense score buffer (index_add_ with the query
        weight as alpha, no temporaries) and takes its top-k. Large batches over large galleries run
        on worker threads (torch releases the GIL). Items sharing no active latent with the query are
        not hits: fewer than k hits leave I = -1, D = -inf.
        """
        nq = q_idx.shape[0]
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or k == 0 or self.n_items == 0:
            return D, I
        active = q_val > 0

        def run(rows: range) -> None:
            scores = torch.zeros(self.n_items, dtype=torch.float32)
            for r in rows:
                d, i = self._search_one(q_idx[r][active[r]], q_val[r][active[r]], k, scores)
                hit = d > 0
                m = int(hit.sum())
                D[r, :m], I[r, :m] = d[hit], i[hit]

        threads = min(nq, threads or torch.get_num_threads())
        if threads <= 1 or nq * self.n_items < 16 * 200_000:  # small work: threads cost more than they give
            run(range(nq))
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, [range(t, nq, threads) for t in range(threads)]))
        return D, I
