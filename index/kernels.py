"""The compiled search kernels over block posting lists (see index/postings.py for the layout and the
approximate path): heap helpers, the exact kernel (batched and lone), the approximate kernel with its
budget cut and exact rescoring, and the merge of partial top-k results. Pure functions of arrays, compiled
with numba (cached on disk, GIL released); index/postings.py decides what runs where.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np

from .merge import gather, merge_order
from .postings_format import BLOCK

_F16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # float16 bits -> float32
APPROX_SPARSE = 3.0  # approximate path: a block's entries above the cut x this < its rows -> touched-row mode
RESCORE_AHEAD = 8  # rescoring: the code row this many candidates ahead is touched, so its lines are on their way


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
            if q_w[q, t] > 0.0:  # negative weights read no postings (see _approx_kernel)
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
                if q_w[q, t] > 0.0:
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
            if q_w[q, t] <= 0.0:  # a negative weight (a boost) picks no candidate: the rescoring applies it
                cb[t] = 0xFFFF
                continue
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


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-part (D, I) [nq, k_i] results (I global rows, -1 = none) merged into the best k per query
    (``merge_order`` keyed by row)."""
    if len(parts) == 1 and parts[0][0].shape[1] == k:
        return parts[0]
    rows = np.concatenate([i for _, i in parts], axis=1)  # once: the merge's key and the payload
    D, at = merge_order([np.concatenate([d for d, _ in parts], axis=1)], k, keys=[rows])
    return D, gather([rows], at)


def _pack_queries(q_idx: np.ndarray, q_val: np.ndarray, n_latents: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Active entries of each query first: (latents int32 [nq, kq], weights float32, counts int32)."""
    q_idx = np.asarray(q_idx)
    q_val = np.asarray(q_val, dtype=np.float32)
    active = q_val != 0  # a negative boost is a weight too; zeros are padding
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
