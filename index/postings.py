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

import math
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np

BLOCK = 1 << 16  # rows per block: local row numbers fit uint16, a block's score buffer fits the L2 cache
_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # float16 bits -> float32
_POOL: ThreadPoolExecutor | None = None
PIECE_POSTINGS = 2_000_000  # postings per piece of work (a few ms): the unit of threading and of stopping
HIST_BINS = 128  # value histogram bins per latent: float16 bits >> 8 (4 bins per octave; positive halves < 0x7C00)
DEFAULT_BUDGET = 0.5  # approximate path: share of the query's postings read (recall@10 >= 0.95 on every bench world)
DEFAULT_CANDIDATES = 300  # approximate path: rows rescored exactly (bench/index_scale.py)
MAX_CANDIDATES = 100_000
APPROX_SPARSE = 3.0  # approximate path: a block's entries above the cut x this < its rows -> touched-row mode
LONE_MIN = 20_000  # a lone query reading at least this many postings runs on numba's threads (a launch: ~10 us)
RESCORE_AHEAD = 8  # rescoring: the code row this many candidates ahead is touched, so its lines are on their way


class SearchStopped(RuntimeError):
    """A search stopped early because its caller asked (deadline passed, call cancelled)."""


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


# ---- the kernel ---------------------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True, inline="always")
def _worse(s1: float, r1: int, s2: float, r2: int) -> bool:
    return s1 < s2 or (s1 == s2 and r1 > r2)  # ties: the lower row ranks first (deterministic)


@numba.njit(nogil=True, cache=True)
def _sift_down(hs, hr, m, s, r):  # pragma: no cover - compiled
    """Put (s, r) at the root of the min-heap of size m (worst at 0) and sift it down."""
    i = 0
    while True:
        c = 2 * i + 1
        if c >= m:
            break
        if c + 1 < m and _worse(hs[c + 1], hr[c + 1], hs[c], hr[c]):
            c += 1
        if _worse(hs[c], hr[c], s, r):
            hs[i] = hs[c]
            hr[i] = hr[c]
            i = c
        else:
            break
    hs[i] = s
    hr[i] = r


@numba.njit(nogil=True, cache=True)
def _heap_push(hs, hr, h, k, s, r):  # pragma: no cover - compiled
    """Push (s, r) into the min-heap (worst at 0) of size h <= k; returns the new size."""
    if h == k:
        if _worse(hs[0], hr[0], s, r):
            _sift_down(hs, hr, h, s, r)  # replace the worst
        return h
    i = h
    while i > 0:  # sift up
        p = (i - 1) // 2
        if _worse(s, r, hs[p], hr[p]):
            hs[i] = hs[p]
            hr[i] = hr[p]
            i = p
        else:
            break
    hs[i] = s
    hr[i] = r
    return h + 1


@numba.njit(nogil=True, cache=True, fastmath=True)
def _max_of(x, a, b):  # pragma: no cover - compiled
    m = np.float32(0.0)
    for i in range(a, b):
        m = max(m, x[i])
    return m


@numba.njit(nogil=True, cache=True)
def _block_postings(q_lat, q_len, q, offsets, base):  # pragma: no cover - compiled
    """Entries of query q's latents in the block whose offsets start at ``base``."""
    size = 0
    for t in range(q_len[q]):
        j = q_lat[q, t]
        size += offsets[base + j + 1] - offsets[base + j]
    return size


@numba.njit(nogil=True, cache=True)
def _mark_filters(req, exc, offsets, items, base, cnt, clear):  # pragma: no cover - compiled
    """In a block: count each row's required latents into cnt and send rows with an excluded latent
    negative; with ``clear``, zero exactly those rows again."""
    for t in range(req.shape[0]):
        j = req[t]
        for p in range(offsets[base + j], offsets[base + j + 1]):
            cnt[items[p]] = 0 if clear else cnt[items[p]] + 1
    for t in range(exc.shape[0]):
        j = exc[t]
        for p in range(offsets[base + j], offsets[base + j + 1]):
            cnt[items[p]] = 0 if clear else -(1 << 30)


@numba.njit(nogil=True, cache=True)
def _search_kernel(
    q_lat, q_w, q_len, q0, q1, b0, b1, req, exc, offsets, items, values, f16, n_items, n_lat, k, D, I
):  # pragma: no cover - compiled
    """Exact top-k for queries [q0, q1) over blocks [b0, b1); rows into D, I (best first, I = -1 past the hits)."""
    score = np.zeros(BLOCK, np.float32)
    cnt = np.zeros(BLOCK if req.shape[0] > 0 or exc.shape[0] > 0 else 1, np.int32)
    touched = np.empty(BLOCK, np.int32)
    hs = np.empty(k, np.float32)
    hr = np.empty(k, np.int64)
    n_req = req.shape[0]
    filtered = n_req > 0 or exc.shape[0] > 0
    for q in range(q0, q1):
        h = 0
        for b in range(b0, b1):
            base = b * n_lat
            size = _block_postings(q_lat, q_len, q, offsets, base)
            if size == 0:
                continue
            row0 = b * BLOCK
            rows = min(BLOCK, n_items - row0)
            sparse = size * 8 < rows  # few postings: remember touched rows; else scan the block (no branch per posting)
            nt = 0
            for t in range(q_len[q]):
                j = q_lat[q, t]
                w = q_w[q, t]
                if sparse:
                    for p in range(offsets[base + j], offsets[base + j + 1]):
                        it = items[p]
                        if score[it] == 0.0:
                            touched[nt] = it
                            nt += 1
                        score[it] += w * f16[values[p]]
                else:
                    for p in range(offsets[base + j], offsets[base + j + 1]):
                        score[items[p]] += w * f16[values[p]]
            if filtered:
                _mark_filters(req, exc, offsets, items, base, cnt, False)
            if sparse:
                for t in range(nt):
                    it = touched[t]
                    s = score[it]
                    score[it] = 0.0
                    if s > 0.0 and (not filtered or cnt[it] == n_req):
                        h = _heap_push(hs, hr, h, k, s, row0 + it)
            else:
                thr = hs[0] if h == k else np.float32(0.0)  # a row must beat the heap's worst (ties: lower row wins)
                for c0 in range(0, rows, 64):  # a SIMD max per 64 rows skips the rows that cannot enter
                    c1 = min(rows, c0 + 64)
                    if _max_of(score, c0, c1) < thr:
                        continue
                    for it in range(c0, c1):
                        s = score[it]
                        if s >= thr and s > 0.0 and (not filtered or cnt[it] == n_req):
                            h = _heap_push(hs, hr, h, k, s, row0 + it)
                            thr = hs[0] if h == k else np.float32(0.0)
                score[:rows] = 0.0
            if filtered:
                _mark_filters(req, exc, offsets, items, base, cnt, True)
        for pos in range(h - 1, -1, -1):  # heap -> best first: pop the worst into the last free place
            D[q, pos] = hs[0]
            I[q, pos] = hr[0]
            _sift_down(hs, hr, pos, hs[pos], hr[pos])
        for pos in range(h, k):
            D[q, pos] = -np.inf
            I[q, pos] = -1


@numba.njit(nogil=True, cache=True, parallel=True)
def _search_lone(
    q_lat, q_w, q_len, req, exc, offsets, items, values, f16, n_items, n_lat, k, D, I, n_parts
):  # pragma: no cover - compiled
    """Exact top-k of one query (row 0) on ``n_parts`` threads of numba's pool: each part scores a range of
    blocks into its own top-k, then the top-k of those."""
    nb = (n_items + BLOCK - 1) // BLOCK
    n_parts = max(1, min(n_parts, nb))
    PD = np.empty((n_parts, k), np.float32)
    PI = np.empty((n_parts, k), np.int64)
    for s in numba.prange(n_parts):
        b0, b1 = s * nb // n_parts, (s + 1) * nb // n_parts
        _search_kernel(q_lat, q_w, q_len, 0, 1, b0, b1, req, exc, offsets, items, values, f16, n_items, n_lat, k,
                       PD[s : s + 1], PI[s : s + 1])  # fmt: skip
    _merge_parts(PD, PI, k, D, I)


@numba.njit(nogil=True, cache=True)
def _merge_parts(PD, PI, k, D, I):  # pragma: no cover - compiled
    """Row 0 of D, I: the best k of the parts' top-k lists PD, PI (I = -1: none)."""
    ks = np.empty(k, np.float32)
    kr = np.empty(k, np.int64)
    m = 0
    for s in range(PD.shape[0]):
        for c in range(PD.shape[1]):
            if PI[s, c] >= 0:
                m = _heap_push(ks, kr, m, k, PD[s, c], PI[s, c])
    for pos in range(m - 1, -1, -1):
        D[0, pos] = ks[0]
        I[0, pos] = kr[0]
        _sift_down(ks, kr, pos, ks[pos], kr[pos])
    for pos in range(m, k):
        D[0, pos] = -np.inf
        I[0, pos] = -1


@numba.njit(nogil=True, cache=True)
def _f16_bits(x):  # pragma: no cover - compiled
    """float16 bit pattern of a positive float32 (rounded down; 0x7C00 past the largest half)."""
    if x >= 65520.0:
        return 0x7C00
    if x <= 0.0:
        return 0
    m, e = math.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    biased = e + 14
    if biased <= 0:
        return int(x * 16777216.0)  # subnormal: value = bits * 2**-24
    return (biased << 10) | int((2.0 * m - 1.0) * 1024.0)


@numba.njit(nogil=True, cache=True)
def _count_at_least(suffix, hist, j, x):  # pragma: no cover - compiled
    """Estimated entries of latent j with value >= x (histogram, linear inside a bin)."""
    bits = _f16_bits(x)
    if bits >= 0x7C00:
        return 0.0
    b = bits >> 8
    return suffix[j, b + 1] + hist[j, b] * (1.0 - (bits & 255) / 256.0)


@numba.njit(nogil=True, cache=True)
def _budget_taus(q_lat, q_w, q_len, suffix, hist, vmax, prio, budget, out):  # pragma: no cover - compiled
    """Per query, the cut tau on priority x weight x value that leaves about ``budget`` of its postings
    (bisection on tau); vmax: an upper bound of each latent's values; prio: each latent's priority."""
    for q in range(q_lat.shape[0]):
        total = 0.0
        hi = 0.0
        for t in range(q_len[q]):
            j = q_lat[q, t]
            total += suffix[j, 0]
            hi = max(hi, q_w[q, t] * prio[j] * vmax[j])
        if budget >= 1.0 or total == 0.0:
            out[q] = 0.0
            continue
        target = budget * total
        lo = hi * 1e-6  # geometric bisection: the cut's relative precision matters, not its absolute one
        for _ in range(14):  # (1e6) ** (2 ** -14): the cut within 0.1%
            mid = math.sqrt(lo * hi)
            c = 0.0
            for t in range(q_len[q]):
                j = q_lat[q, t]
                c += _count_at_least(suffix, hist, j, mid / (q_w[q, t] * prio[j]))
            if c > target:
                lo = mid
            else:
                hi = mid
        out[q] = hi


@numba.njit(nogil=True, cache=True)
def _keep_best(hs, hr, h, n):  # pragma: no cover - compiled
    """Keep the best n of the h > n buffered candidates (in place); returns (n, the n-th best score)."""
    thr = np.partition(hs[:h], h - n)[h - n]
    ties = n
    for i in range(h):
        if hs[i] > thr:
            ties -= 1
    w = 0
    for i in range(h):  # in place, forwards (w <= i): the strictly better, then ties with the n-th up to n
        if hs[i] > thr or (hs[i] == thr and ties > 0):
            if hs[i] == thr:
                ties -= 1
            hs[w] = hs[i]
            hr[w] = hr[i]
            w += 1
    return w, thr


@numba.njit(nogil=True, cache=True)
def _approx_kernel(
    q_lat,
    q_w,
    q_len,
    tau,
    budget,
    q0,
    q1,
    b0,
    b1,
    req,
    exc,
    offsets,
    items,
    values,
    f16,
    n_items,
    n_lat,
    ordered,
    prio,
    n_cand,
    CS,
    CR,
    qoff,
):  # pragma: no cover - compiled
    """Candidates for queries [q0, q1) over blocks [b0, b1): entries of impact >= tau[q] are scored and the
    best ``n_cand`` rows by that partial score go into CS[q - qoff] (partial scores), CR[q - qoff] (rows; -1
    past the last). Returns a value of no meaning (it keeps the early touches from being optimised away)."""
    score = np.zeros(BLOCK, np.float32)
    cnt = np.zeros(BLOCK if req.shape[0] > 0 or exc.shape[0] > 0 else 1, np.int32)
    touched = np.empty(BLOCK + 1, np.int32)  # rows as read (repeats too); past BLOCK entries: the block is scanned
    cb = np.empty(q_lat.shape[1], np.uint16)  # per query latent: float16 bits of its value cut
    hs = np.empty(2 * n_cand, np.float32)  # candidates: kept above thr, cut back to the best n_cand when full
    hr = np.empty(2 * n_cand, np.int64)
    n_req = req.shape[0]
    filtered = n_req > 0 or exc.shape[0] > 0
    n_entries = items.shape[0]
    sink = 0
    for q in range(q0, q1):
        h = 0
        thr = np.float32(0.0)
        for t in range(q_len[q]):  # value >= cut  <=>  bits >= cb (positive halves order as their bits)
            cut = tau[q] / (q_w[q, t] * prio[q_lat[q, t]])
            bits = _f16_bits(cut)
            cb[t] = bits + 1 if bits < 0x7C00 and f16[bits] < cut else bits
        for b in range(b0, b1):
            base = b * n_lat
            if b + 1 < b1:  # the next block's list heads miss the cache: start fetching them now
                for t in range(q_len[q]):
                    a = offsets[base + n_lat + q_lat[q, t]]
                    if a < n_entries:
                        sink += items[a] + values[a]
            size = _block_postings(q_lat, q_len, q, offsets, base)
            if size == 0:
                continue
            row0 = b * BLOCK
            rows = min(BLOCK, n_items - row0)
            sparse = size * budget * APPROX_SPARSE < rows  # few entries above the cut: remember touched rows
            nt = 0
            for t in range(q_len[q]):
                j = q_lat[q, t]
                w = q_w[q, t]
                c_t = cb[t]
                a = offsets[base + j]
                e = offsets[base + j + 1]
                # a value-ordered list stops at the cut (read in order: bisection would miss the cache)
                if sparse:
                    for p in range(a, e):
                        x = values[p]
                        if x < c_t:
                            if ordered:
                                break
                            continue
                        it = items[p]
                        touched[nt] = it  # every entry (no test of the row: no wait on the score's load)
                        nt += nt < BLOCK
                        score[it] += w * f16[x]
                else:
                    for p in range(a, e):
                        x = values[p]
                        if x < c_t:
                            if ordered:
                                break
                            continue
                        score[items[p]] += w * f16[x]
            if sparse and nt >= BLOCK:  # more entries than the list holds: scan the block instead
                sparse = False
            if filtered:
                _mark_filters(req, exc, offsets, items, base, cnt, False)
            if sparse:
                for t in range(nt):
                    it = touched[t]
                    s = score[it]
                    score[it] = 0.0
                    if s > thr and (not filtered or cnt[it] == n_req):
                        hs[h] = s
                        hr[h] = row0 + it
                        h += 1
                        if h == 2 * n_cand:
                            h, thr = _keep_best(hs, hr, h, n_cand)
            else:
                for c0 in range(0, rows, 64):
                    c1 = min(rows, c0 + 64)
                    if _max_of(score, c0, c1) <= thr:
                        continue
                    for it in range(c0, c1):
                        s = score[it]
                        if s > thr and (not filtered or cnt[it] == n_req):
                            hs[h] = s
                            hr[h] = row0 + it
                            h += 1
                            if h == 2 * n_cand:
                                h, thr = _keep_best(hs, hr, h, n_cand)
                score[:rows] = 0.0
            if filtered:
                _mark_filters(req, exc, offsets, items, base, cnt, True)
        if h > n_cand:
            h, thr = _keep_best(hs, hr, h, n_cand)
        for c in range(h):
            CS[q - qoff, c] = hs[c]
            CR[q - qoff, c] = hr[c]
        for c in range(h, n_cand):
            CS[q - qoff, c] = 0.0
            CR[q - qoff, c] = -1
    return sink


@numba.njit(nogil=True, cache=True)
def _rescore(q_lat, q_w, q_len, q0, q1, cand, coff, cidx, cval, f16, n_lat, k, D, I):  # pragma: no cover - compiled
    """Exact scores of each query's candidate rows (cand[q - coff] [m], -1 = none) from the codes (cidx,
    cval: float16 bits); the top-k of them into D, I (best first; ties: lower row first). Returns a value
    of no meaning (it keeps the touches ahead from being optimised away)."""
    qd = np.zeros(n_lat, np.float32)
    ks = np.empty(k, np.float32)
    kr = np.empty(k, np.int64)
    width = cidx.shape[1]
    m_cand = cand.shape[1]
    sink = 0
    for q in range(q0, q1):
        for t in range(q_len[q]):
            qd[q_lat[q, t]] = q_w[q, t]
        m = 0
        for c in range(m_cand):
            if c + RESCORE_AHEAD < m_cand:  # random rows miss the cache: start fetching one a few rows ahead
                r2 = cand[q - coff, c + RESCORE_AHEAD]
                if r2 >= 0:
                    for u in range(0, width, 32):
                        sink += cidx[r2, u] + cval[r2, u]
            r = cand[q - coff, c]
            if r < 0:
                continue
            s = np.float32(0.0)
            for u in range(width):
                w = qd[cidx[r, u]]
                if w != 0.0:  # most of an item's latents are not in the query: skip the value lookup
                    s += w * f16[cval[r, u]]
            if s > 0.0:
                m = _heap_push(ks, kr, m, k, s, r)
        for t in range(q_len[q]):
            qd[q_lat[q, t]] = 0.0
        for pos in range(m - 1, -1, -1):
            D[q, pos] = ks[0]
            I[q, pos] = kr[0]
            _sift_down(ks, kr, pos, ks[pos], kr[pos])
        for pos in range(m, k):
            D[q, pos] = -np.inf
            I[q, pos] = -1
    return sink


@numba.njit(nogil=True, cache=True)
def _approx_search(
    q_lat,
    q_w,
    q_len,
    tau,
    budget,
    q0,
    q1,
    req,
    exc,
    offsets,
    items,
    values,
    f16,
    n_items,
    n_lat,
    ordered,
    prio,
    n_cand,
    cidx,
    cval,
    k,
    D,
    I,
):  # pragma: no cover - compiled
    """The approximate path for queries [q0, q1) over the whole gallery in one call, a query at a time:
    candidates (``_approx_kernel``), then their exact rescoring into D, I."""
    CS = np.empty((1, n_cand), np.float32)
    CR = np.empty((1, n_cand), np.int64)
    nb = (n_items + BLOCK - 1) // BLOCK
    sink = 0
    for q in range(q0, q1):
        sink += _approx_kernel(q_lat, q_w, q_len, tau, budget, q, q + 1, 0, nb, req, exc, offsets, items, values, f16,
                       n_items, n_lat, ordered, prio, n_cand, CS, CR, q)  # fmt: skip
        sink += _rescore(q_lat, q_w, q_len, q, q + 1, CR, q, cidx, cval, f16, n_lat, k, D, I)
    return sink


@numba.njit(nogil=True, cache=True, parallel=True)
def _approx_lone(
    q_lat,
    q_w,
    q_len,
    tau,
    budget,
    req,
    exc,
    offsets,
    items,
    values,
    f16,
    n_items,
    n_lat,
    ordered,
    prio,
    n_cand,
    cidx,
    cval,
    k,
    D,
    I,
    n_parts,
):  # pragma: no cover - compiled
    """The approximate path for one query (row 0) on ``n_parts`` threads of numba's pool (a launch costs
    microseconds, where a hand-off between Python threads costs a good part of such a query): each part
    reads a range of blocks, the best ``n_cand`` of all parts' candidates are rescored, split again."""
    nb = (n_items + BLOCK - 1) // BLOCK
    n_parts = max(1, min(n_parts, nb))
    CS = np.zeros((n_parts, n_cand), np.float32)
    CR = np.full((n_parts, n_cand), -1, np.int64)
    sink = 0
    for s in numba.prange(n_parts):
        b0, b1 = s * nb // n_parts, (s + 1) * nb // n_parts
        sink += _approx_kernel(q_lat, q_w, q_len, tau, budget, 0, 1, b0, b1, req, exc, offsets, items, values, f16,
                       n_items, n_lat, ordered, prio, n_cand, CS[s : s + 1], CR[s : s + 1], 0)  # fmt: skip
    hs = np.empty(n_parts * n_cand, np.float32)
    hr = np.empty(n_parts * n_cand, np.int64)
    h = 0
    for s in range(n_parts):
        for c in range(n_cand):
            if CR[s, c] >= 0:
                hs[h] = CS[s, c]
                hr[h] = CR[s, c]
                h += 1
    if h > n_cand:
        h, _ = _keep_best(hs, hr, h, n_cand)
    # rescoring, split the same way: each part's top-k, then the top-k of those
    per = -(-h // n_parts)
    PD = np.full((n_parts, k), -np.inf, np.float32)
    PI = np.full((n_parts, k), -1, np.int64)
    cand = np.full((n_parts, max(per, 1)), -1, np.int64)
    for s in range(n_parts):
        for c in range(s * per, min(h, (s + 1) * per)):
            cand[s, c - s * per] = hr[c]
    for s in numba.prange(n_parts):
        sink += _rescore(q_lat, q_w, q_len, 0, 1, cand[s : s + 1], 0, cidx, cval, f16, n_lat, k, PD[s : s + 1], PI[s : s + 1])
    _merge_parts(PD, PI, k, D, I)
    return sink


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part (D, I) [nq, k_i] results (I already global, -1 = none) into the best k per query."""
    if len(parts) == 1 and parts[0][0].shape[1] == k:
        return parts[0]
    D = np.concatenate([d for d, _ in parts], axis=1)
    I = np.concatenate([i for _, i in parts], axis=1)
    order = np.lexsort((np.where(I < 0, np.iinfo(np.int64).max, I), -D), axis=1)[:, :k]
    D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return D, I


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
        require: list[int] | None = None,
        exclude: list[int] | None = None,
        should_stop: Callable[[], bool] | None = None,
        approx: tuple[float, int, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products <query code, item code>. q_idx, q_val: [nq, kq] -> (D, I) [nq, k].

        Exact by default. ``approx`` = (budget, candidates, codes_idx, codes_val) makes it approximate (see
        the module doc): about ``budget`` of each query's postings, highest impact first, pick
        ``candidates`` rows per piece of work, rescored exactly from the codes ([n_items, k] latent ids
        and float16 values); every score returned is exact.

        Items sharing no active latent with the query are not hits: fewer than k hits leave I = -1,
        D = -inf; equal scores rank the lower row first. ``require`` / ``exclude``: latents a hit must /
        must not have active, applied inside the kernel. ``should_stop`` is polled between pieces of the
        batch; once true the search raises SearchStopped.
        """
        nq = q_idx.shape[0]
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or k == 0 or self.n_items == 0:
            return D, I
        q_lat, q_w, q_len = _pack_queries(q_idx, q_val, self._n_latents)
        req = np.array(sorted(set(require)), dtype=np.int32) if require else _NONE
        exc = np.array(sorted(set(exclude)), dtype=np.int32) if exclude else _NONE
        if len(req) and len(exc) and np.isin(req, exc).any():
            return D, I  # nothing can both have and not have a latent
        threads = max(1, min(threads or search_threads(), search_threads()))
        if approx is None:
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
        budget, n_cand, cidx, cval = approx
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if not 1 <= n_cand <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be in [1, {MAX_CANDIDATES}], got {n_cand}")
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


def _pack_queries(q_idx: np.ndarray, q_val: np.ndarray, n_latents: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Active entries of each query first: (latents int32 [nq, kq], weights float32, counts int32)."""
    q_idx = np.asarray(q_idx)
    q_val = np.asarray(q_val, dtype=np.float32)
    active = q_val > 0
    if active.all():  # the common case (no padding): nothing to move
        if q_idx.size and (q_idx.min() < 0 or q_idx.max() >= n_latents):
            raise ValueError(f"query latents must be in [0, {n_latents})")
        n = np.full(len(q_idx), q_idx.shape[1] if q_idx.ndim == 2 else 0, dtype=np.int32)
        return np.ascontiguousarray(q_idx, dtype=np.int32), np.ascontiguousarray(q_val), n
    if active.any() and (q_idx[active].min() < 0 or q_idx[active].max() >= n_latents):
        raise ValueError(f"query latents must be in [0, {n_latents})")
    if len(q_idx) == 1:  # a lone query: keep its active entries
        lat = q_idx[active]
        return lat.astype(np.int32)[None], q_val[active][None], np.array([len(lat)], dtype=np.int32)
    order = np.argsort(~active, axis=1, kind="stable")
    q_lat = np.ascontiguousarray(np.take_along_axis(q_idx, order, 1), dtype=np.int32)
    q_w = np.ascontiguousarray(np.take_along_axis(np.where(active, q_val, 0), order, 1), dtype=np.float32)
    return q_lat, q_w, active.sum(1).astype(np.int32)


class PostingsWriter:
    """Builds block postings one block of codes at a time (memory bounded by one block), in memory or
    appending to ``post_items.bin`` / ``post_values.bin`` in ``directory``."""

    def __init__(self, n_latents: int, directory: Path | None = None) -> None:
        self.n_latents = n_latents
        self.offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.total = 0
        self.dir = directory
        self.hist = np.zeros((n_latents, HIST_BINS), dtype=np.int64)  # values per latent (see the module doc)
        self._items: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._f = None
        if directory is not None:
            self._f = (open(directory / "post_items.bin", "wb"), open(directory / "post_values.bin", "wb"))

    def add_block(self, indices: np.ndarray, values: np.ndarray) -> None:
        """One block (at most BLOCK rows) of codes: [nb, k] latent ids and float16-representable values."""
        nb = len(indices)
        if nb > BLOCK:
            raise ValueError(f"a block holds at most {BLOCK} rows, got {nb}")
        values = np.asarray(values, dtype=np.float16)
        active = values > 0
        small = np.int16 if self.n_latents <= np.iinfo(np.int16).max else np.int32
        lat = np.asarray(indices)[active].astype(small)  # 16-bit keys: numpy's stable sort is a radix sort
        local = np.broadcast_to(np.arange(nb, dtype=np.uint16)[:, None], active.shape)[active]
        vals = values[active].view(np.uint16)
        by_value = np.argsort(np.uint16(0xFFFF) - vals, kind="stable")  # largest first, rows ascending on ties
        order = by_value[np.argsort(lat[by_value], kind="stable")]  # then by latent (both radix sorts)
        counts = np.bincount(lat.astype(np.int64), minlength=self.n_latents)
        if len(counts) > self.n_latents:
            raise ValueError(f"a code holds latent {len(counts) - 1}, beyond n_latents {self.n_latents}")
        bins = np.minimum(vals >> 8, HIST_BINS - 1).astype(np.int64)
        self.hist += np.bincount(lat.astype(np.int64) * HIST_BINS + bins, minlength=self.hist.size).reshape(self.hist.shape)
        self.offsets.append(self.total + np.cumsum(counts))
        self.total += int(len(lat))
        items, vals = np.ascontiguousarray(local[order]), np.ascontiguousarray(vals[order])
        if self._f is not None:
            self._f[0].write(items.tobytes())
            self._f[1].write(vals.tobytes())
        else:
            self._items.append(items)
            self._values.append(vals)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(offsets, items, values); items/values are None when written to files (flushed and fsynced)."""
        offsets = np.concatenate(self.offsets)
        if self._f is not None:
            for f in self._f:
                f.flush()
                os.fsync(f.fileno())
                f.close()
            with open(self.dir / "post_hist.npy", "wb") as f:
                np.save(f, self.hist.astype(np.uint32), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            return offsets, None, None
        items = np.concatenate(self._items) if self._items else np.zeros(0, np.uint16)
        vals = np.concatenate(self._values) if self._values else np.zeros(0, np.uint16)
        return offsets, items, vals


def load_postings(directory: Path, n_items: int, n_latents: int, mmap: bool = True) -> Postings:
    """Postings written by a PostingsWriter into ``directory`` (memory-mapped read-only by default)."""
    offsets = np.load(directory / "post_offsets.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mode = "r" if mmap else None

        def raw(name: str) -> np.ndarray:
            f = directory / name
            if f.stat().st_size == 0:
                return np.zeros(0, dtype=np.uint16)
            return np.memmap(f, dtype=np.uint16, mode="r") if mode else np.fromfile(f, dtype=np.uint16)

        hist_file = directory / "post_hist.npy"  # present: the lists are value-ordered
        hist = np.load(hist_file, allow_pickle=False) if hist_file.exists() else None
        return Postings(offsets, raw("post_items.bin"), raw("post_values.bin"), n_items, n_latents, hist=hist)


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
