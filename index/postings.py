"""Exact sparse latent search: block posting lists scored by a compiled kernel.

Items are cut into blocks of BLOCK (65,536) rows. Inside a block, each latent has a posting list of
(row in block: uint16, value: float16 bits), so an active entry costs 4 bytes and the index never holds a
dense [n_items, n_latents] matrix. A query scores one block at a time into a 256 KB buffer that stays in
cache, remembers the rows it touched, pushes them into a k-heap and zeroes only them: the work of a query
is proportional to the postings it touches (plus a few offset reads per block), never to n_items, and no
buffer of n_items floats exists. The kernel is compiled with numba and releases the GIL; a batch is split
over a process-wide pool of threads (by query, or by block for a heavy query), and a lone query of up to a
few milliseconds runs its block ranges on numba's own threads (a launch costs microseconds where a hand-off
between Python threads costs a good part of such a query).

Inside a list, entries are ordered by value, largest first (ties: lower row first), and every part keeps a
histogram of each latent's values (``post_hist.npy``). That gives the approximate path its cut: a query's
entries of priority x weight x value at least tau (priority log(1 + n / items on the latent): a latent on
most items tells them apart least), tau chosen from the histograms so that a ``budget`` share of the
query's postings is scored, are read (each list's prefix), the best ``candidates`` rows by
that partial score are rescored exactly from the stored codes, and the top-k of those is returned. Parts
written before lists were value-ordered (no histogram file) still answer correctly (their lists are read
whole, skipping the entries below the cut), just without the speed-up.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numba
import numpy as np

from .errors import SearchStopped
from .kernels import (
    _F16,
    _approx_kernel,
    _approx_lone,
    _approx_search,
    _budget_taus,
    _pack_queries,
    _rescore,
    _search_kernel,
    _search_lone,
    merge_topk,
)
from .params import DEFAULT_BUDGET, DEFAULT_CANDIDATES, MAX_CANDIDATES, ApproxParams
from .postings_format import BLOCK, HIST_BINS, PostingsWriter, read_postings

__all__ = [
    "BLOCK", "DEFAULT_BUDGET", "DEFAULT_CANDIDATES", "HIST_BINS", "LONE_MIN", "MAX_CANDIDATES", "PIECE_POSTINGS",
    "Postings", "PostingsWriter", "SearchStopped", "load_postings", "merge_topk", "search_threads", "warm_up",
]  # fmt: skip

_POOL: ThreadPoolExecutor | None = None
PIECE_POSTINGS = 2_000_000  # postings per piece of work (a few ms): the unit of threading and of stopping
LONE_MIN = 20_000  # a lone query reading at least this many postings runs on numba's threads (a launch: ~10 us)


def search_threads() -> int:
    """Threads the sparse kernel may use per call (SPARC_SEARCH_THREADS, else the CPUs this process may use)."""
    env = os.environ.get("SPARC_SEARCH_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(search_threads(), thread_name_prefix="sparc-postings")
    return _POOL


def _forget_pool() -> None:
    global _POOL, _LONE_FORKED
    _POOL = None  # a forked child has none of the parent's threads: it starts its own pool
    _LONE_FORKED = True  # and an OpenMP runtime started before a fork can hang in the child: no numba threads


_LONE = threading.Lock()  # one lone query at a time on numba's threads (not every threading layer is thread-safe)
_LONE_FORKED = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


# ---- the index ----------------------------------------------------------------------------------------
class Postings:
    """Block posting lists over ``n_items`` rows: block b, latent j holds entries
    [offsets[b * n_latents + j], offsets[b * n_latents + j + 1]) of ``items`` (uint16 row in block) and
    ``values`` (float16 bits as uint16)."""

    def __init__(
        self,
        offsets: np.ndarray,
        items: np.ndarray,
        values: np.ndarray,
        n_items: int,
        n_latents: int,
        hist: np.ndarray | None = None,
    ) -> None:
        """``hist``: [n_latents, HIST_BINS] value histogram, given when the lists are value-ordered (see the
        module doc); without it the lists are taken as row-ordered and a histogram is counted when needed."""
        self.n_items = int(n_items)
        self._n_latents = int(n_latents)
        self.n_blocks = max(1, -(-self.n_items // BLOCK))
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.items = np.asarray(items)
        self.values = np.asarray(values)
        if self.items.dtype != np.uint16 or self.values.dtype != np.uint16:
            raise ValueError("posting items and values must be uint16 (row in block, float16 bits)")
        if len(self.offsets) != self.n_blocks * self._n_latents + 1:
            raise ValueError(f"{len(self.offsets)} posting offsets for {self.n_blocks} blocks x {self._n_latents} latents")
        if len(self.items) != len(self.values) or int(self.offsets[-1]) != len(self.items):
            raise ValueError("posting offsets, items and values disagree in length")
        # The compiled kernels read items[offsets[j]:offsets[j + 1]] unchecked: offsets from a file must start at
        # 0 and never decrease (with the last equal to the entry count, they then stay in range).
        if int(self.offsets[0]) != 0 or bool((np.diff(self.offsets) < 0).any()):
            raise ValueError("posting offsets must start at 0 and never decrease (corrupt post_offsets.npy)")
        self._counts: np.ndarray | None = None
        self.value_ordered = hist is not None
        if hist is not None and np.shape(hist) != (self._n_latents, HIST_BINS):
            raise ValueError(f"value histogram of shape {np.shape(hist)}, expected ({self._n_latents}, {HIST_BINS})")
        self._hist = None if hist is None else np.asarray(hist, dtype=np.float64)
        self._suffix: np.ndarray | None = None

    @property
    def n_latents(self) -> int:
        return self._n_latents

    @property
    def n_entries(self) -> int:
        return len(self.items)

    @classmethod
    def from_codes(cls, indices: np.ndarray, values: np.ndarray, n_latents: int) -> Postings:
        """Build in memory from item codes [n, k] (indices, values); only active (value > 0) entries are kept."""
        w = PostingsWriter(n_latents)
        for a in range(0, max(len(indices), 1), BLOCK):
            w.add_block(indices[a : a + BLOCK], values[a : a + BLOCK])
        offsets, items, vals = w.finish()
        return cls(offsets, items, vals, len(indices), n_latents, hist=w.hist)

    def posting(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and float32 values of one latent's posting list (all blocks)."""
        rows, vals = [], []
        for b in range(self.n_blocks):
            a, e = self.offsets[b * self._n_latents + latent], self.offsets[b * self._n_latents + latent + 1]
            rows.append(np.asarray(self.items[a:e], dtype=np.int64) + b * BLOCK)
            vals.append(_F16[np.asarray(self.values[a:e])])
        return np.concatenate(rows), np.concatenate(vals)

    def warm_up(self, codes_idx: np.ndarray | None = None, codes_val: np.ndarray | None = None) -> None:
        """Compile (or load from numba's cache) every kernel this gallery can run, with its own array types
        (memory-mapped, read-only arrays are other signatures than in-memory ones): exact and approximate,
        batched and lone, with and without filters. A server calls it before it reports SERVING."""
        global LONE_MIN
        counts = self.latent_counts()
        used = np.flatnonzero(counts)
        if self.n_items == 0 or not len(used):
            return
        common = used[np.argsort(-counts[used], kind="stable")[:2]]
        rare = used[np.argsort(counts[used], kind="stable")[:1]]  # little work: always allowed to run lone
        approx = [None] if codes_idx is None else [None, (0.5, 16, codes_idx, codes_val)]
        for a in approx:
            for lats in (common, rare):
                q_idx, q_val = lats[None, :].astype(np.int64), np.linspace(1.0, 0.5, len(lats), dtype=np.float32)[None, :]
                self.search(q_idx, q_val, 2, approx=a)
                self.search(np.repeat(q_idx, 2, 0), np.repeat(q_val, 2, 0), 2, approx=a)
                self.search(q_idx, q_val, 2, require=[int(lats[0])], exclude=[int(common[-1]) + 1], approx=a)
            if self.n_blocks > 1 and search_threads() > 1:  # the lone kernels, on numba's threads
                saved, LONE_MIN = LONE_MIN, 0
                try:
                    self.search(rare[None, :].astype(np.int64), np.ones((1, 1), np.float32), 2, approx=a)
                finally:
                    LONE_MIN = saved

    def latent_counts(self) -> np.ndarray:
        """Active items of every latent (all blocks)."""
        if self._counts is None:
            per_block = np.diff(np.asarray(self.offsets)).reshape(self.n_blocks, self._n_latents)
            self._counts = per_block.sum(0)
        return self._counts

    def value_histogram(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hist [n_latents, HIST_BINS], suffix sums [n_latents, HIST_BINS + 1], an upper bound of each
        latent's values) of the entries' values; counted from the lists (block by block) when the part did
        not store one."""
        if self._suffix is None:
            if self._hist is None:
                hist = np.zeros(self._n_latents * HIST_BINS, dtype=np.int64)
                for b in range(self.n_blocks):
                    o = np.asarray(self.offsets[b * self._n_latents : (b + 1) * self._n_latents + 1])
                    lat = np.repeat(np.arange(self._n_latents, dtype=np.int64), np.diff(o))
                    bins = np.asarray(self.values[o[0] : o[-1]]) >> 8
                    hist += np.bincount(lat * HIST_BINS + np.minimum(bins, HIST_BINS - 1), minlength=len(hist))
                self._hist = hist.reshape(self._n_latents, HIST_BINS).astype(np.float64)
            suffix = np.zeros((self._n_latents, HIST_BINS + 1), dtype=np.float64)
            suffix[:, :-1] = np.cumsum(self._hist[:, ::-1], axis=1)[:, ::-1]
            top = np.where(self._hist.any(1), HIST_BINS - 1 - np.argmax(self._hist[:, ::-1] > 0, axis=1), 0)
            # bin b holds float16 bits [256 b, 256 (b + 1)): exponent b >> 2, top mantissa bits b & 3
            self._vmax = np.minimum(np.ldexp(1.0 + 0.25 * ((top & 3) + 1), (top >> 2) - 15), 65504.0)
            self._suffix = suffix
        return self._hist, self._suffix, self._vmax

    def priorities(self) -> np.ndarray:
        """Each latent's reading priority on the approximate path: log(1 + n_items / items on it), so a
        latent on most items (its entries tell items apart least) is read after rarer ones."""
        if getattr(self, "_prio", None) is None:
            df = np.maximum(self.latent_counts().astype(np.float64), 1.0)
            self._prio = np.log1p(self.n_items / df).astype(np.float32)
        return self._prio

    def nbytes(self) -> int:
        return self.offsets.nbytes + self.items.nbytes + self.values.nbytes

    def search(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        threads: int | None = None,
        require: list[int] | tuple[int, ...] | None = None,
        exclude: list[int] | tuple[int, ...] | None = None,
        should_stop: Callable[[], bool] | None = None,
        approx: tuple[float, int, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``search_exact``, or with ``approx`` = (budget, candidates, codes_idx, codes_val) ``search_approx``."""
        if approx is None:
            return self.search_exact(q_idx, q_val, k, threads, require, exclude, should_stop)
        budget, candidates, codes_idx, codes_val = approx
        params = ApproxParams(budget, candidates)
        return self.search_approx(q_idx, q_val, k, params, codes_idx, codes_val, threads, require, exclude, should_stop)

    def _prepare(self, q_idx: np.ndarray, q_val: np.ndarray, k: int, threads: int | None, require: Any, exclude: Any) -> tuple:
        """The (D, I) a call fills and, unless nothing can match (no query, no item, a latent both required
        and excluded: None), its packed queries, filters and thread count."""
        nq = q_idx.shape[0]
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or k == 0 or self.n_items == 0:
            return D, I, None
        q_lat, q_w, q_len = _pack_queries(q_idx, q_val, self._n_latents)
        req = np.array(sorted(set(require)), dtype=np.int32) if require else _NONE
        exc = np.array(sorted(set(exclude)), dtype=np.int32) if exclude else _NONE
        if len(req) and len(exc) and np.isin(req, exc).any():
            return D, I, None  # nothing can both have and not have a latent
        threads = max(1, min(threads or search_threads(), search_threads()))
        return D, I, (q_lat, q_w, q_len, req, exc, threads)

    def search_exact(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        threads: int | None = None,
        require: list[int] | tuple[int, ...] | None = None,
        exclude: list[int] | tuple[int, ...] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products <query code, item code>. q_idx, q_val: [nq, kq] -> (D, I) [nq, k].

        Items sharing no active latent with the query are not hits: fewer than k hits leave I = -1,
        D = -inf; equal scores rank the lower row first. ``require`` / ``exclude``: latents a hit must /
        must not have active, applied inside the kernel. ``should_stop`` is polled between pieces of the
        batch; once true the search raises SearchStopped.
        """
        D, I, ready = self._prepare(q_idx, q_val, k, threads, require, exclude)
        if ready is None:
            return D, I
        q_lat, q_w, q_len, req, exc, threads = ready
        nq = len(D)
        args = (req, exc, self.offsets, self.items, self.values, _F16, self.n_items, self._n_latents, k)

        def kernel(q0: int, q1: int, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray]:
            whole = b0 == 0 and b1 == self.n_blocks  # whole gallery: straight into the answer
            d, i = (D, I) if whole else (np.empty((nq, k), np.float32), np.empty((nq, k), np.int64))
            _search_kernel(q_lat, q_w, q_len, q0, q1, b0, b1, *args, d, i)
            return d[q0:q1], i[q0:q1]

        if self._lone(nq, threads, q_lat, q_len, 1.0):
            _run_lone(lambda: _search_lone(q_lat, q_w, q_len, *args, D, I, threads), threads, should_stop)
            return D, I
        pieces = self._pieces(q_lat, q_len, threads)
        results = _map_pieces(kernel, pieces, threads, should_stop)
        split: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for (q0, _q1, b0, b1), r in zip(pieces, results):
            if not (b0 == 0 and b1 == self.n_blocks):
                split.setdefault(q0, []).append(r)
        for q0, outs in split.items():  # a heavy query searched as block ranges: merge its pieces
            D[q0 : q0 + 1], I[q0 : q0 + 1] = merge_topk(outs, k)
        return D, I

    def search_approx(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        params: ApproxParams,
        cidx: np.ndarray,
        cval: np.ndarray,
        threads: int | None = None,
        require: list[int] | tuple[int, ...] | None = None,
        exclude: list[int] | tuple[int, ...] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """As ``search_exact``, approximately (see the module doc): about ``params.budget`` of each query's
        postings, highest impact first, pick ``params.candidates`` rows per piece of work, rescored exactly
        from the codes ``cidx`` / ``cval`` ([n_items, k] latent ids and float16 values); every score
        returned is exact."""
        D, I, ready = self._prepare(q_idx, q_val, k, threads, require, exclude)
        if ready is None:
            return D, I
        q_lat, q_w, q_len, req, exc, threads = ready
        nq = len(D)
        budget, n_cand = params.budget, params.candidates
        if np.shape(cidx)[0] != self.n_items or np.shape(cval) != np.shape(cidx):
            raise ValueError("codes for the approximate path must be [n_items, k] latent ids and values")
        hist, suffix, vmax = self.value_histogram()
        prio = self.priorities()
        tau = np.zeros(nq, dtype=np.float32)
        _budget_taus(q_lat, q_w, q_len, suffix, hist, vmax, prio, float(budget), tau)
        cval_bits = cval.view(np.uint16) if cval.dtype == np.float16 else np.asarray(cval, np.float16).view(np.uint16)
        n_cand = min(max(int(n_cand), k), self.n_items)
        args = (req, exc, self.offsets, self.items, self.values, _F16, self.n_items, self._n_latents,
                self.value_ordered, prio, n_cand)  # fmt: skip

        def run(q0: int, q1: int, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray] | None:
            if b0 == 0 and b1 == self.n_blocks:  # whole gallery: candidates and rescoring in one call
                _approx_search(q_lat, q_w, q_len, tau, np.float32(budget), q0, q1, req, exc, *args[2:],
                               cidx, cval_bits, k, D, I)  # fmt: skip
                return None
            cs, cr = np.empty((q1 - q0, n_cand), np.float32), np.empty((q1 - q0, n_cand), np.int64)
            _approx_kernel(q_lat, q_w, q_len, tau, np.float32(budget), q0, q1, b0, b1, *args, cs, cr, q0)
            return cs, cr

        if self._lone(nq, threads, q_lat, q_len, float(budget)):
            _run_lone(lambda: _approx_lone(q_lat, q_w, q_len, tau, np.float32(budget), req, exc, *args[2:], cidx, cval_bits,
                                           k, D, I, threads), threads, should_stop)  # fmt: skip
            return D, I
        pieces = self._pieces(q_lat, q_len, threads, float(budget))
        results = _map_pieces(run, pieces, threads, should_stop)
        split = {}
        for (q0, _q1, _b0, _b1), r in zip(pieces, results):
            if r is not None:
                split.setdefault(q0, []).append(r)
        for q0, outs in split.items():  # a heavy query read as block ranges: its best candidates, rescored
            _, cr = merge_topk([(cs, np.where(cs > 0, cr, -1)) for cs, cr in outs], n_cand)
            _rescore(q_lat, q_w, q_len, q0, q0 + 1, cr, q0, cidx, cval_bits, _F16, self._n_latents, k, D, I)
        return D, I

    def _lone(self, nq: int, threads: int, q_lat: np.ndarray, q_len: np.ndarray, share: float) -> bool:
        """Whether a call runs as a lone query on numba's threads (then it holds _LONE: release it). Only one
        query, on more than one block, with work between LONE_MIN and a few pieces (a few ms: should_stop
        is polled before it starts, larger work goes in pieces where it is polled as they go), and only one
        such query at a time in the process (not every threading layer is thread-safe), never in a child
        forked from a process that used them (an OpenMP runtime does not survive a fork)."""
        if nq != 1 or threads < 2 or self.n_blocks < 2 or _LONE_FORKED:
            return False
        work = int(self.latent_counts()[q_lat[0, : q_len[0]]].sum() * share)
        return LONE_MIN <= work <= PIECE_POSTINGS * threads and _LONE.acquire(blocking=False)

    def _pieces(
        self, q_lat: np.ndarray, q_len: np.ndarray, threads: int, share: float = 1.0, min_piece: int | None = None
    ) -> list[tuple[int, int, int, int]]:
        """Cut a batch into pieces of about PIECE_POSTINGS postings each: (q0, q1, b0, b1). Light queries are
        grouped; a heavy query (a large gallery) is cut into block ranges. Small pieces let ``should_stop``
        be polled often and spread the work over threads. ``share``: the part of its postings a query reads;
        ``min_piece``: no piece is cut smaller than this to feed more threads (default PIECE_POSTINGS / 8)."""
        counts = self.latent_counts()
        if len(q_lat) == 1:  # a lone query (the common call): no mask
            work = np.array([int(counts[q_lat[0, : q_len[0]]].sum() * share)], dtype=np.int64)
        else:
            active = np.arange(q_lat.shape[1])[None, :] < q_len[:, None]
            work = ((counts[q_lat] * active).sum(1) * share).astype(np.int64)
        target = max(1, PIECE_POSTINGS)
        min_piece = PIECE_POSTINGS // 8 if min_piece is None else min_piece
        if threads > 1:  # enough pieces for every thread (a lone query over a large gallery too)
            target = max(1, min(target, max(int(work.sum()) // (2 * threads), min_piece)))
        pieces, q0, acc = [], 0, 0
        for q, w in enumerate(work.tolist()):
            if w > target and self.n_blocks > 1:  # heavy: alone, over block ranges
                if q > q0:
                    pieces.append((q0, q, 0, self.n_blocks))
                n_split = min(self.n_blocks, -(-w // target))
                per = -(-self.n_blocks // n_split)
                pieces += [(q, q + 1, b, min(self.n_blocks, b + per)) for b in range(0, self.n_blocks, per)]
                q0, acc = q + 1, 0
                continue
            acc += w
            if acc >= target:
                pieces.append((q0, q + 1, 0, self.n_blocks))
                q0, acc = q + 1, 0
        if q0 < len(work):
            pieces.append((q0, len(work), 0, self.n_blocks))
        return pieces


_NONE = np.zeros(0, dtype=np.int32)
_STOPPED = object()


def _run_lone(call: Callable[[], object], threads: int, should_stop: Callable[[], bool] | None) -> None:
    """Run a lone query's parallel kernel (``Postings._lone`` granted, so _LONE is held: released here)."""
    try:
        if should_stop is not None and should_stop():
            raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        call()
    finally:
        _LONE.release()


def _map_pieces(
    fn: Callable[[int, int, int, int], object],
    pieces: list[tuple[int, int, int, int]],
    threads: int,
    should_stop: Callable[[], bool] | None,
) -> list:
    """``fn(q0, q1, b0, b1)`` over the pieces, in parallel, results in order; ``should_stop`` is polled
    before each piece (raises SearchStopped once true). When every piece has a thread, this thread takes
    the first itself (one hand-off fewer: it matters for sub-millisecond queries)."""

    def run(piece: tuple[int, int, int, int]) -> object:
        if should_stop is not None and should_stop():
            return _STOPPED
        return fn(*piece)

    results: list = []
    if len(pieces) == 1 or threads == 1:
        for p in pieces:
            results.append(run(p))
            if results[-1] is _STOPPED:
                break
    elif len(pieces) <= threads:
        futures = [_pool().submit(run, p) for p in pieces[1:]]
        results = [run(pieces[0])] + [f.result() for f in futures]
    else:
        results = list(_pool().map(run, pieces))
    if any(r is _STOPPED for r in results):
        raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
    return results


def load_postings(directory: Path, n_items: int, n_latents: int, mmap: bool = True) -> Postings:
    """Postings written by a PostingsWriter into ``directory`` (memory-mapped read-only by default)."""
    offsets, items, values, hist = read_postings(directory, mmap)
    return Postings(offsets, items, values, n_items, n_latents, hist=hist)


def warm_up() -> None:
    """Compile (or load the cached) kernels now, so the first real query does not pay for it."""
    p = Postings.from_codes(np.array([[0, 1]]), np.array([[0.6, 0.8]]), 2)
    p.search(np.array([[0, 1]]), np.array([[1.0, 0.5]], dtype=np.float32), 1)
    p.search(np.array([[0, 1]]), np.array([[1.0, 0.5]], dtype=np.float32), 1, require=[0], exclude=[1])
    codes = (np.array([[0, 1]], dtype=np.int16), np.array([[0.6, 0.8]], dtype=np.float16))
    p.search(np.array([[0, 1]]), np.array([[1.0, 0.5]], dtype=np.float32), 1, approx=(0.5, 4, *codes))
    n = BLOCK + 1  # two blocks: a lone approximate query on numba's threads
    codes = (np.zeros((n, 1), dtype=np.int16), np.full((n, 1), 0.5, dtype=np.float16))
    p = Postings.from_codes(*codes, 2)
    p.search(np.array([[0]]), np.array([[1.0]], dtype=np.float32), 1)
    p.search(np.array([[0]]), np.array([[1.0]], dtype=np.float32), 1, approx=(1.0, 4, *codes))
