"""Index search: speed and quality side by side, every number measured in this run.

The gallery is the DINO stream of a planted-concept world whose codes are as dense as real ones
(L0 >= 32 at n_latents 8192, k 64); queries are the CLIP-text rows of the first gallery items, so query i's
true match is item i. For each path and setting the run measures, on distinct queries (no query is timed
twice in a cell):

- recall@10 against brute force computed independently in numpy (dense matmul over the same stored codes
  for the sparse path, over the same stored vectors for the dense path; FAISS Flat for the raw baseline),
- R@1 / R@10 against the ground truth (the paired item),
- latency per call and queries/s, variants alternating in rounds, medians reported.

Baselines a user would pick: FAISS IndexFlatIP and IndexHNSWFlat over the raw 768-d CLIP image features
(queried with raw CLIP text), and scipy's CSR sparse matrix product over the same SPARC codes.

    python bench/index_search.py --train runs/bench-index      # once: trains the checkpoint on the bench world
    python bench/index_search.py --checkpoint runs/bench-index --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp

from index import Searcher, build_bundle
from sparc_core import SparseCode, load_checkpoint
from sparc_core.worlds.synthetic import INDEX_WORLD as WORLD
from sparc_core.worlds.synthetic import PlantedConcepts
from sparc_core.worlds.synthetic import index_gallery as synth_gallery

GALLERY, QUERY, RAW_GALLERY, N_QUERIES = "dino", "clip_txt", "clip_img", 1024


def train_checkpoint(out: Path, steps: int, n_train: int = 60_000, chunk: int = 10_000) -> None:
    """The bench checkpoint: n_latents 8192 (kept whole: the index width under test), k 64, shipped defaults
    otherwise, on WORLD (written in chunks)."""
    from sparc_core import TrainConfig, train

    data = out.parent / (out.name + "-data")
    data.mkdir(parents=True, exist_ok=True)
    world = PlantedConcepts(WORLD)
    arrays = {
        s: np.lib.format.open_memmap(data / f"{s}.npy", mode="w+", dtype=np.float32, shape=(n_train, d))
        for s, d in WORLD.streams.items()
    }
    for i, a in enumerate(range(0, n_train, chunk)):
        feats, _ = world.sample(min(chunk, n_train - a), seed=i)
        for s, x in feats.items():
            arrays[s][a : a + len(x)] = x
    for x in arrays.values():
        x.flush()
    feats = {s: str(data / f"{s}.npy") for s in WORLD.streams}
    cfg = TrainConfig(
        features=feats, out=str(out), n_latents=8192, k=64, steps=steps, eval_every=steps, save_every=steps, prune_unused=False
    )
    train(cfg)


def top10_numpy(scores_fn, n_items: int, nq: int, chunk: int) -> np.ndarray:
    """Brute-force top-10 item rows per query, from score blocks over item chunks."""
    best_s = np.full((nq, 10), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 10), dtype=np.int64)
    for a in range(0, n_items, chunk):
        s = scores_fn(a, min(n_items, a + chunk))
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(a, a + s.shape[1]), s.shape)], axis=1)
        top = np.argpartition(-cand_s, 9, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def recall10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10].tolist()) & set(t[:10].tolist())) / 10 for f, t in zip(found, truth)]))


def quality(found: np.ndarray) -> dict[str, float]:
    """R@1 / R@10 against the ground truth: query i's paired item is row i."""
    q = np.arange(len(found))[:, None]
    return {"R@1": float((found[:, :1] == q).any(1).mean()), "R@10": float((found[:, :10] == q).any(1).mean())}


def time_rounds(variants: dict, batches: dict[int, list], rounds: int) -> dict[tuple[str, int], float]:
    """Median seconds per call of each (variant, batch size), variants alternating within each round."""
    lat: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for bs, chunks in batches.items():
            for name, fn in variants.items():
                for q in chunks:  # distinct queries in every call
                    t0 = time.perf_counter()
                    fn(q)
                    lat.setdefault((name, bs), []).append(time.perf_counter() - t0)
    return {key: float(np.median(v)) for key, v in lat.items()}


def run_size(n: int, args: argparse.Namespace, model, work: Path) -> list[dict]:
    gal_path, raw, xq_raw = synth_gallery(n, work)
    nq = len(xq_raw)
    t0 = time.perf_counter()
    build_bundle(args.checkpoint, GALLERY, gal_path, work / "b", progress=False, model=model)
    build_s = time.perf_counter() - t0
    searcher = Searcher(work / "b", model=model)
    bundle = searcher.shards[0]
    code = searcher.encode(QUERY, xq_raw)  # encoded once: the timings are of search itself
    c_idx, c_val = bundle.codes(np.arange(n))
    l0_items = float((c_val > 0).sum(1).mean())

    # Independent brute force over the stored codes: query unit codes (dense) @ item codes (dense, per chunk).
    q_dense = code.to_dense().numpy()
    q_dense /= np.linalg.norm(q_dense, axis=1, keepdims=True).clip(1e-12)

    def sparse_scores(a: int, b: int) -> np.ndarray:
        g = np.zeros((b - a, model.n_latents), dtype=np.float32)
        np.put_along_axis(g, c_idx[a:b], c_val[a:b], axis=1)
        return q_dense @ g.T

    truth_sparse = top10_numpy(sparse_scores, n, nq, 8192)
    # Dense path: the same vectors the FAISS index holds, searched by brute force in numpy.
    xq_dense = searcher._dense_queries(code)
    truth_dense = top10_numpy(lambda a, b: xq_dense @ bundle.parts[0].dense_index.reconstruct_n(a, b - a).T, n, nq, 65536)
    # Raw CLIP baseline: exact IP over raw CLIP image features with raw CLIP text queries.
    truth_raw = top10_numpy(lambda a, b: xq_raw @ raw[a:b].T, n, nq, 65536)

    flat = faiss.IndexFlatIP(raw.shape[1])
    t0 = time.perf_counter()
    flat.add(raw)
    flat_build = time.perf_counter() - t0
    if n > args.hnsw_max:
        del raw  # the Flat index holds its own copy; HNSW (the only other user) is skipped at this size
    hnsw, hnsw_build = None, float("nan")
    if n <= args.hnsw_max:
        hnsw = faiss.IndexHNSWFlat(raw.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        t0 = time.perf_counter()
        hnsw.add(raw)
        hnsw_build = time.perf_counter() - t0
    # scipy CSR over the same stored codes.
    t0 = time.perf_counter()
    csr = sp.csr_matrix(
        (c_val.ravel(), c_idx.ravel(), np.arange(0, n * c_idx.shape[1] + 1, c_idx.shape[1])), shape=(n, model.n_latents)
    )
    csr_t = csr.T.tocsr()
    csr_build = time.perf_counter() - t0

    def code_rows(q: np.ndarray) -> SparseCode:
        return SparseCode(code.indices[q], code.values[q], code.n_latents)

    def scipy_search(q: np.ndarray) -> np.ndarray:
        out = []
        for a in range(0, len(q), 64):  # 64 queries at a time: a dense [64, n] score block (256 MB at 1M)
            s = (sp.csr_matrix(q_dense[q[a : a + 64]]) @ csr_t).toarray()
            top = np.argpartition(s, s.shape[1] - 10, axis=1)[:, -10:]
            out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), 1), 1))
        return np.concatenate(out)

    def hnsw_search(ef: int):
        def fn(q: np.ndarray) -> np.ndarray:
            hnsw.hnsw.efSearch = ef
            return hnsw.search(xq_raw[q], 10)[1]

        return fn

    def ids_of(res) -> np.ndarray:
        return np.array([[int(i) for i in row] + [-1] * (10 - len(row)) for row in res.ids])

    variants = {
        "sparc sparse (postings)": lambda q: searcher.search(code_rows(q), top_k=10, path="sparse"),
        "sparc approx (default budget)": lambda q: searcher.search(code_rows(q), top_k=10, path="approx"),
        "sparc approx budget 0.05": lambda q: searcher.search(code_rows(q), top_k=10, path="approx", budget=0.05),
        "sparc dense (FAISS Flat, cross-decoded)": lambda q: searcher.search(code_rows(q), top_k=10, path="dense"),
        "scipy CSR over the same codes": scipy_search,
        "FAISS Flat raw CLIP 768-d": lambda q: flat.search(xq_raw[q], 10)[1],
    }
    if hnsw is not None:
        variants["FAISS HNSW32 ef64 raw CLIP"] = hnsw_search(64)
        variants["FAISS HNSW32 ef256 raw CLIP"] = hnsw_search(256)
    # Quality: every query once, per variant.
    everyone = np.arange(nq)
    found = {}
    for name, fn in variants.items():
        out = fn(everyone)
        found[name] = ids_of(out) if hasattr(out, "ids") else np.asarray(out)
    reference = {
        "sparc sparse (postings)": truth_sparse,
        "sparc approx (default budget)": truth_sparse,
        "sparc approx budget 0.05": truth_sparse,
        "sparc dense (FAISS Flat, cross-decoded)": truth_dense,
        "scipy CSR over the same codes": truth_sparse,
    }
    # Speed: batch 1 over 64 distinct queries and batch 256 over 4 distinct batches, in alternating rounds.
    rng = np.random.default_rng(0)
    perm = rng.permutation(nq)
    batches = {1: [perm[i : i + 1] for i in range(64)], 256: [perm[i : i + 256] for i in range(0, nq, 256)]}
    secs = time_rounds(variants, batches, args.rounds)
    builds = {
        "sparc sparse (postings)": build_s,
        "sparc approx (default budget)": build_s,
        "sparc approx budget 0.05": build_s,
        "sparc dense (FAISS Flat, cross-decoded)": build_s,
        "scipy CSR over the same codes": csr_build,
        "FAISS Flat raw CLIP 768-d": flat_build,
        "FAISS HNSW32 ef64 raw CLIP": hnsw_build,
        "FAISS HNSW32 ef256 raw CLIP": hnsw_build,
    }
    rows = []
    for name in variants:
        ref = reference.get(name, truth_raw)
        q = quality(found[name])
        for bs in batches:
            rows.append(
                {
                    "n": n,
                    "method": name,
                    "batch": bs,
                    "qps": bs / secs[(name, bs)],
                    "p50_ms": 1e3 * secs[(name, bs)],
                    "recall@10 vs brute force": recall10(found[name], ref),
                    "R@1": q["R@1"],
                    "R@10": q["R@10"],
                    "build_s": builds[name],
                    "L0 items": l0_items,
                }
            )
    flat_qps = {r["batch"]: r["qps"] for r in rows if r["method"] == "FAISS Flat raw CLIP 768-d"}
    for r in rows:
        r["x FAISS Flat qps"] = r["qps"] / flat_qps[r["batch"]]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/bench-index", help="a checkpoint trained by --train")
    p.add_argument("--train", metavar="DIR", help="train the bench checkpoint into DIR and exit")
    p.add_argument("--steps", type=int, default=600, help="training steps for --train")
    p.add_argument("--n-train", type=int, default=60_000, help="training rows for --train")
    p.add_argument("--sizes", default="100000")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (variants alternate within each)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed after)")
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="skip the HNSW baseline above this size (its build)")
    args = p.parse_args()
    if args.train:
        train_checkpoint(Path(args.train), args.steps, args.n_train)
        return
    model = load_checkpoint(args.checkpoint)
    print(
        f"checkpoint {args.checkpoint}: n_latents {model.n_latents}, k {model.k}; faiss {faiss.__version__}; "
        f"threads {faiss.omp_get_max_threads()}; {N_QUERIES} distinct queries; medians of {args.rounds} rounds"
    )
    header = [
        "n",
        "method",
        "batch",
        "qps",
        "x FAISS Flat qps",
        "p50_ms",
        "recall@10 vs brute force",
        "R@1",
        "R@10",
        "build_s",
        "L0 items",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in (int(x) for x in args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"sparc-bench-{n}-", dir=args.workdir))
        try:
            for r in run_size(n, args, model, work):
                cells = [f"{r[h]:.3g}" if isinstance(r[h], float) else str(r[h]) for h in header]
                print("| " + " | ".join(cells) + " |", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
