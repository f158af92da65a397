"""Index at scale: exact sparse search vs the approximate paths (ours: impact-ordered budget; Seismic) vs
FAISS Flat / HNSW on raw 768-d vectors, at 1M and 10M items, every number measured in this run.

Codes are synthetic with a realistic, skewed latent-frequency distribution (index/synthetic_codes.py: 8192
latents, log-normal firing rates), in one of two worlds: ``skewed`` (every item an independent draw: no
neighbour stands out, the worst case for any approximate search) or ``topics`` (items share half their
latents with one of n/100 topics: queries have true neighbours, as a caption has its image). Queries are
200 distinct codes drawn the same way. For each size:

- the bundle is built in a child process from code chunks (bounded memory): build time and the child's
  peak RSS; bytes per item on disk (the search memory-maps them, so this is also what it keeps resident);
- ground truth: brute force in numpy/scipy over the same stored codes, in chunks (recall@10 counts a hit
  when its true score reaches the 10th true score: ties are not misses);
- exact sparse (our kernel), Seismic at a few settings, FAISS IndexFlatIP and IndexHNSWFlat over random
  768-d float32 vectors (their cost does not depend on the content), single queries (p50/p99 latency,
  queries/s) and one batch of all queries; variants alternate over rounds and medians are reported.

    python bench/index_scale.py --sizes 1000000,10000000 --l0 64
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from index.bundle import Bundle, build_bundle_from_codes
from index.params import ApproxParams, SeismicParams
from index.synthetic_codes import code_chunks, latent_probabilities, sample_codes, topic_chunks, topic_codes

N_LATENTS = 8192


def n_topics(n: int) -> int:
    return max(1, n // 100)


def build_child(out: str, n: int, k: int, l0: int, sigma: float, world: str = "skewed") -> None:
    """(In a child process) write a bundle of n synthetic codes in bounded memory."""
    p = latent_probabilities(N_LATENTS, sigma)
    if world == "topics":
        chunks = topic_chunks(n, k, p, n_topics(n), seed=1)
    else:
        chunks = ((i, v) for i, v in code_chunks(n, k, p, seed=1))
    build_bundle_from_codes(out, chunks, n, k, N_LATENTS, progress=False)


def queries(world: str, n: int, nq: int, k: int, p: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if world == "topics":
        return topic_codes(nq, k, p, n_topics(n), seed=seed)
    return sample_codes(nq, k, p, seed=seed)


def timed_build(out: Path, n: int, k: int, l0: int, sigma: float, world: str = "skewed") -> tuple[float, float]:
    """(seconds, peak RSS GB) of a bundle build in a child process."""
    code = (f"import sys; sys.argv=['x']; import index_scale as b; "
            f"b.build_child({str(out)!r}, {n}, {k}, {l0}, {sigma}, {world!r})")  # fmt: skip
    env = os.environ | {"PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"build of {n} items failed (status {status})")
    return time.perf_counter() - t0, usage.ru_maxrss / 1e6  # ru_maxrss: kB on Linux


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def search_child(bundle: str, n_queries: int, k: int, sigma: float, world: str = "skewed", n: int = 0) -> None:
    """(In a child process) load a bundle, search distinct queries one at a time and as a batch; print the
    resident memory before loading and the peak after (kB)."""
    from index.postings import warm_up

    warm_up()
    p = latent_probabilities(N_LATENTS, sigma)
    qi, qv = queries(world, n, n_queries, k, p, seed=123)
    base = _status_kb("VmRSS")
    b = Bundle(bundle)
    for q in range(n_queries):
        b.search_sparse(qi[q : q + 1], qv[q : q + 1].astype(np.float32), 10)
    b.search_sparse(qi, qv.astype(np.float32), 10)
    print(f"RSS {base} {_status_kb('VmHWM')}", flush=True)


def search_rss(out: Path, n_queries: int, k: int, sigma: float, world: str, n: int) -> float:
    """Resident bytes a fresh process adds by loading the bundle and searching it (mapped pages included)."""
    code = f"import index_scale as b; b.search_child({str(out)!r}, {n_queries}, {k}, {sigma}, {world!r}, {n})"
    env = os.environ | {"PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    base, peak = (int(x) for x in res.stdout.split("RSS ")[1].split()[:2])
    return (peak - base) * 1e3


def truth_top10(bundle: Bundle, qi: np.ndarray, qv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-10 scores and rows over the stored codes (scipy CSR, 1M items at a time)."""
    import scipy.sparse as sp

    nq = len(qi)
    Q = sp.csr_matrix((qv.ravel(), (np.repeat(np.arange(nq), qi.shape[1]), qi.ravel())), shape=(nq, N_LATENTS))
    best_s = np.full((nq, 10), -np.inf, dtype=np.float32)
    best_r = np.full((nq, 10), -1, dtype=np.int64)
    for rows, idx, val in bundle.iter_codes(chunk=1 << 20):
        m, kk = idx.shape
        G = sp.csr_matrix((val.ravel(), (np.repeat(np.arange(m), kk), idx.ravel().astype(np.int64))), shape=(m, N_LATENTS))
        S = (Q @ G.T).toarray().astype(np.float32)
        top = np.argpartition(-S, 10, axis=1)[:, :10]
        s = np.concatenate([best_s, np.take_along_axis(S, top, 1)], 1)
        r = np.concatenate([best_r, rows[top]], 1)
        o = np.argsort(-s, axis=1)[:, :10]
        best_s, best_r = np.take_along_axis(s, o, 1), np.take_along_axis(r, o, 1)
    return best_s, best_r


def recall_at_10(found_scores: list[np.ndarray], truth_s: np.ndarray) -> float:
    """Share of the 10 returned items per query whose true score reaches the 10th true score (tie-aware)."""
    hits = [np.sum(np.asarray(s[:10]) >= t[9] - 1e-4) for s, t in zip(found_scores, truth_s)]
    return float(np.mean(hits) / 10)


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--l0", type=int, default=64, help="active latents per item (and code width k)")
    ap.add_argument("--sigma", type=float, default=1.0, help="spread of log-normal latent firing rates")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flat-max", type=int, default=2_000_000, help="largest size with FAISS Flat (768-d float32 in RAM)")
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="largest size with an HNSW build (slow on few cores)")
    ap.add_argument("--world", choices=["skewed", "topics"], default="skewed")
    ap.add_argument("--budgets", default="0.05,0.1,0.3", help="approximate path (ours): shares of postings read")
    ap.add_argument("--candidates", type=int, default=0, help="approximate path (ours): rows rescored (0: default)")
    ap.add_argument(
        "--flat-chunked-max",
        type=int,
        default=10_000_000,
        help="sizes above --flat-max: FAISS Flat scanned as chunks of --flat-max vectors, times summed",
    )
    ap.add_argument("--seismic-max", type=int, default=10_000_000)
    ap.add_argument("--heap-factors", default="0.7,0.9")
    ap.add_argument("--seismic-postings", type=int, default=0, help="Seismic n_postings (0: the shipped auto default)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = ap.parse_args()
    import faiss

    from index.postings import search_threads, warm_up

    warm_up()
    threads = search_threads()
    faiss.omp_set_num_threads(threads)
    k = args.l0
    p = latent_probabilities(N_LATENTS, args.sigma)
    rows_out = []
    tmp = tempfile.TemporaryDirectory(prefix="sparc-scale-", dir=args.work)
    print(f"world: {args.world}")
    for n in [int(x) for x in args.sizes.split(",")]:
        qi, qv16 = queries(args.world, n, args.queries, k, p, seed=987_654)
        qv = qv16.astype(np.float32)
        work = Path(tmp.name) / f"n{n}"
        build_s, rss = timed_build(work / "bundle", n, k, args.l0, args.sigma, args.world)
        b = Bundle(work / "bundle")
        disk = sum(b.manifest.files.values())
        counts = b.parts[0].postings.latent_counts()
        l0 = float(sum(p.postings.n_entries for p in b.parts) / n)
        print(
            f"\n== {n:,} items: L0 {l0:.1f}, busiest latent on {counts.max() / n:.1%} of items, "
            f"median {np.median(counts) / n:.2%}"
        )
        print(f"build {build_s:.1f} s, peak RSS {rss:.2f} GB, {disk / n:.0f} bytes/item on disk (memory-mapped)")
        added = search_rss(work / "bundle", 2 * args.queries, k, args.sigma, args.world, n)
        print(f"a fresh process loading it and searching {2 * args.queries} queries adds {added / 1e9:.2f} GB resident, "
              f"{added / n:.0f} bytes/item")  # fmt: skip
        t0 = time.perf_counter()
        truth_s, _ = truth_top10(b, qi, qv)
        print(f"brute-force truth: {time.perf_counter() - t0:.1f} s")
        cells: dict[str, dict[str, list]] = {}

        def cell(name: str, cells: dict = cells) -> dict[str, list]:
            return cells.setdefault(name, {"single": [], "lat": [], "batch": [], "recall": []})

        def exact_round(b: Bundle = b, truth_s: np.ndarray = truth_s, qi: np.ndarray = qi, qv: np.ndarray = qv) -> None:
            c = cell("exact sparse (ours)")
            lat = []
            for q in range(len(qi)):
                t = time.perf_counter()
                b.search_sparse(qi[q : q + 1], qv[q : q + 1], 10)
                lat.append(time.perf_counter() - t)
            c["lat"] += lat
            c["single"].append(len(qi) / sum(lat))
            t = time.perf_counter()
            D, I = b.search_sparse(qi, qv, 10)
            c["batch"].append(len(qi) / (time.perf_counter() - t))
            c["recall"].append(recall_at_10([d[d > -np.inf] for d in D], truth_s))

        variants = [exact_round]
        from index.postings import DEFAULT_BUDGET, DEFAULT_CANDIDATES

        cands = args.candidates or DEFAULT_CANDIDATES
        for budget in sorted({float(x) for x in args.budgets.split(",")} | {DEFAULT_BUDGET}):
            tag = " (default)" if budget == DEFAULT_BUDGET and cands == DEFAULT_CANDIDATES else ""
            variants.append(approx_variant(b, qi, qv, truth_s, budget, cands, cell, tag))
        if n <= args.seismic_max:
            hfs = [float(x) for x in args.heap_factors.split(",")]
            variants += seismic_variants(b, work, qi, qv, truth_s, hfs, k, cell, threads, args.seismic_postings)
        if n <= args.flat_max:
            variants += faiss_variants(n, qi, cell, args.hnsw_max)
        elif n <= args.flat_chunked_max:
            variants.append(flat_chunked_variant(n, qi, cell, args.flat_max))
        for _ in range(args.rounds):
            for v in variants:
                v()
        for name, c in cells.items():
            rows_out.append((n, name, np.median(c["recall"]) if c["recall"] else float("nan"), np.median(c["single"]),
                             1e3 * np.median(c["lat"]), 1e3 * p99(c["lat"]), np.median(c["batch"])))  # fmt: skip
        print_table([r for r in rows_out if r[0] == n])
    print(f"\nall sizes ({threads} threads; recall@10 vs brute force over the same codes; FAISS rows: random 768-d, recall n/a)")
    print_table(rows_out)


def print_table(rows: list[tuple]) -> None:
    exact = {r[0]: r for r in rows if r[1].startswith("exact")}
    flat = {r[0]: r for r in rows if r[1].startswith("FAISS Flat")}
    cols = ["items", "method", "recall@10", "single q/s", "p50 ms", "p99 ms", "batch q/s"]
    cols += ["single / exact", "batch / exact", "single / Flat", "batch / Flat"]
    print("| " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, name, rec, single, p50, p99_, batch in rows:
        e, f = exact.get(n), flat.get(n)
        rs = f"{single / e[3]:.2f}x" if e else "-"
        rb = f"{batch / e[6]:.2f}x" if e else "-"
        fs = f"{single / f[3]:.1f}x" if f else "-"
        fb = f"{batch / f[6]:.2f}x" if f else "-"
        rec_s = "n/a" if np.isnan(rec) else f"{rec:.3f}"
        print(f"| {n:,} | {name} | {rec_s} | {single:.1f} | {p50:.2f} | {p99_:.2f} | {batch:.1f} | {rs} | {rb} | {fs} | {fb} |")


def approx_variant(b, qi, qv, truth_s, budget, candidates, cell, tag):
    """Our approximate path: about ``budget`` of each query's postings, ``candidates`` rescored exactly."""
    name = f"approx (ours) budget {budget:g}, candidates {candidates}{tag}"

    def run() -> None:
        c = cell(name)
        lat, found = [], []
        for q in range(len(qi)):
            t = time.perf_counter()
            D, _ = b.search_approx(qi[q : q + 1], qv[q : q + 1], 10, ApproxParams(budget, candidates))
            lat.append(time.perf_counter() - t)
            found.append(D[0][D[0] > -np.inf])
        c["lat"] += lat
        c["single"].append(len(qi) / sum(lat))
        t = time.perf_counter()
        b.search_approx(qi, qv, 10, ApproxParams(budget, candidates))
        c["batch"].append(len(qi) / (time.perf_counter() - t))
        c["recall"].append(recall_at_10(found, truth_s))  # scores are exact (rescored from the codes)

    return run


def flat_chunked_variant(n, qi, cell, chunk):
    """FAISS IndexFlatIP over n random 768-d vectors that do not fit in memory at once: scanned as
    chunks of ``chunk`` vectors (a Flat search is a linear scan: the chunks' times add up to the whole's),
    the chunks regenerated once per round; per query and per batch, the search times are summed."""
    import faiss

    xq = np.random.default_rng(1).standard_normal((len(qi), 768), dtype=np.float32)
    n_single = min(len(xq), 20)
    name = f"FAISS Flat (raw 768-d, scanned as {chunk:,}-vector chunks)"

    def run() -> None:
        c = cell(name)
        single = np.zeros(n_single)
        batch = 0.0
        for i, a in enumerate(range(0, n, chunk)):
            rng = np.random.default_rng(1000 + i)
            index = faiss.IndexFlatIP(768)
            index.add(rng.standard_normal((min(n, a + chunk) - a, 768), dtype=np.float32))
            for q in range(n_single):
                t = time.perf_counter()
                index.search(xq[q : q + 1], 10)
                single[q] += time.perf_counter() - t
            t = time.perf_counter()
            index.search(xq, 10)
            batch += time.perf_counter() - t
            del index
        c["lat"] += single.tolist()
        c["single"].append(n_single / single.sum())
        c["batch"].append(len(xq) / batch)

    return run


def seismic_variants(b, work, qi, qv, truth_s, heap_factors, k, cell, threads, n_postings):
    """Seismic through the bundle's seismic path (candidates rescored exactly)."""
    from index.bundle import add_seismic_index
    from index.seismic_backend import SeismicSettings

    t0 = time.perf_counter()
    add_seismic_index(b.path, SeismicSettings(n_postings=n_postings))
    tag = f"n_postings {n_postings}" if n_postings else "n_postings auto"
    print(f"seismic build: {time.perf_counter() - t0:.1f} s ({tag})")
    ab = Bundle(b.path)
    out = []
    for hf in heap_factors:
        name = f"seismic {tag}, heap_factor {hf}"

        def run(hf=hf, name=name) -> None:
            c = cell(name)
            lat, found = [], []
            for q in range(len(qi)):
                t = time.perf_counter()
                D, _ = ab.search_seismic(qi[q : q + 1], qv[q : q + 1], 10, SeismicParams(heap_factor=hf))
                lat.append(time.perf_counter() - t)
                found.append(D[0][D[0] > -np.inf])
            c["lat"] += lat
            c["single"].append(len(qi) / sum(lat))
            t = time.perf_counter()
            ab.search_seismic(qi, qv, 10, SeismicParams(heap_factor=hf))
            c["batch"].append(len(qi) / (time.perf_counter() - t))
            c["recall"].append(recall_at_10(found, truth_s))  # its scores are exact (rescored from the codes)

        out.append(run)
    return out


def faiss_variants(n, qi, cell, hnsw_max):
    import faiss

    rng = np.random.default_rng(0)
    xb = np.empty((n, 768), dtype=np.float32)
    for a in range(0, n, 1 << 18):
        xb[a : a + (1 << 18)] = rng.standard_normal((min(n, a + (1 << 18)) - a, 768), dtype=np.float32)
    xq = rng.standard_normal((len(qi), 768), dtype=np.float32)
    flat = faiss.IndexFlatIP(768)
    flat.add(xb)
    indexes = [("FAISS Flat (raw 768-d)", flat)]
    if n <= hnsw_max:
        h = faiss.IndexHNSWFlat(768, 32, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        h.add(xb)
        print(f"HNSW32 build: {time.perf_counter() - t0:.1f} s")
        indexes.append(("FAISS HNSW32 (raw 768-d)", h))
    out = []
    for name, ix in indexes:

        def run(ix=ix, name=name) -> None:
            c = cell(name)
            lat = []
            for q in range(min(len(xq), 50) if "Flat" in name else len(xq)):  # Flat singles are slow: 50 distinct
                t = time.perf_counter()
                ix.search(xq[q : q + 1], 10)
                lat.append(time.perf_counter() - t)
            c["lat"] += lat
            c["single"].append(len(lat) / sum(lat))
            t = time.perf_counter()
            ix.search(xq, 10)
            c["batch"].append(len(xq) / (time.perf_counter() - t))

        out.append(run)
    return out


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
