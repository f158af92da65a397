"""Index build and search benchmark on planted-concept data, against a raw-feature FAISS baseline.

For each gallery size: DINO-stream gallery features are synthesised from the checkpoint's training world
(the demo's SynthConfig), a bundle is built from them (timed), and CLIP-text queries of the paired items
search it through both paths. In the same run, the baseline a user would otherwise pick is measured:
FAISS IndexFlatIP over the raw 768-d CLIP image features of the same gallery, queried with raw CLIP text.

    python bench/index_search.py --checkpoint runs/demo/sparc --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index import Searcher, build_bundle
from index.bundle import Bundle
from sparc_core import SparseCode, load_checkpoint
from sparc_core.demo import DEMO_SYNTH
from sparc_core.synthetic import PlantedConcepts

GALLERY, QUERY, BASELINE = "dino", "clip_txt", "clip_img"


def synth_gallery(n: int, out: Path, chunk: int = 100_000) -> tuple[Path, Path, np.ndarray]:
    """Paired gallery features written chunk by chunk to .npy memmaps; returns paths and the query rows."""
    world = PlantedConcepts(DEMO_SYNTH)
    dims = DEMO_SYNTH.streams
    gal = np.lib.format.open_memmap(out / f"{GALLERY}.npy", mode="w+", dtype=np.float32, shape=(n, dims[GALLERY]))
    base = np.lib.format.open_memmap(out / f"{BASELINE}.npy", mode="w+", dtype=np.float32, shape=(n, dims[BASELINE]))
    queries = []
    for i, a in enumerate(range(0, n, chunk)):
        b = min(n, a + chunk)
        feats, _ = world.sample(b - a, seed=1000 + i)
        gal[a:b], base[a:b] = feats[GALLERY], feats[BASELINE]
        if a == 0:
            queries = feats[QUERY][:1024]
    gal.flush()
    base.flush()
    return out / f"{GALLERY}.npy", out / f"{BASELINE}.npy", np.asarray(queries)


def timed(fn, xq: np.ndarray, batch: int, max_queries: int, budget_s: float) -> dict[str, float]:
    """Latency per call and queries/s for batches of ``batch`` queries."""
    lat = []
    t_start = time.perf_counter()
    i = 0
    while i < max_queries and time.perf_counter() - t_start < budget_s:
        q = xq[(i % len(xq)) : (i % len(xq)) + batch]
        if len(q) < batch:
            q = xq[:batch]
        t0 = time.perf_counter()
        fn(q)
        lat.append(time.perf_counter() - t0)
        i += batch
    lat_a = np.array(lat)
    return {
        "qps": batch * len(lat) / lat_a.sum(),
        "p50_ms": 1e3 * np.percentile(lat_a, 50),
        "p99_ms": 1e3 * np.percentile(lat_a, 99),
    }


def recall_at(ids_a: list[list], ids_b: list[list], k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids_a, ids_b)]))


def run_size(n: int, args: argparse.Namespace, model, work: Path) -> list[dict]:
    rows = []
    gal_path, base_path, xq_raw = synth_gallery(n, work)
    t0 = time.perf_counter()
    build_bundle(args.checkpoint, GALLERY, gal_path, work / "exact", progress=False, model=model)
    build_s = time.perf_counter() - t0
    bundle = Bundle(work / "exact")
    disk = sum(f.stat().st_size for f in bundle.vdir.iterdir())
    mem = bundle.memory_bytes()
    sparse_disk = disk - bundle.manifest.files.get("dense.faiss", 0)
    searcher = Searcher(work / "exact", model=model)
    code = searcher.encode(QUERY, xq_raw)  # queries are encoded once: the timings are of search itself

    def head(q: np.ndarray) -> SparseCode:
        return SparseCode(code.indices[: len(q)], code.values[: len(q)], code.n_latents)

    def run(path: str, **kw):
        return lambda q: searcher.search(head(q), top_k=10, path=path, **kw)

    exact = {p: searcher.search(code, top_k=10, path=p).ids for p in ("sparse", "dense")}
    budget = args.budget
    for path in ("sparse", "dense"):
        for batch in (1, 256):
            t = timed(run(path), xq_raw, batch, 256 if batch == 1 else 1024, budget)
            rows.append(
                {
                    "n": n,
                    "method": f"sparc {path} exact",
                    "batch": batch,
                    **t,
                    "recall@10": 1.0,
                    "mem_B/item": mem[path] / n,
                    "disk_B/item": (sparse_disk if path == "sparse" else disk - sparse_disk + 8 * n) / n,
                    "build_s": build_s,
                    "build_items/s": n / build_s,
                }
            )
    # Approximate dense setting against exact dense.
    if n >= 100_000 and args.ivf:
        nlist = int(4 * np.sqrt(n))
        t0 = time.perf_counter()
        build_bundle(
            args.checkpoint, GALLERY, gal_path, work / "ivf", faiss_factory=f"IVF{nlist},Flat", progress=False, model=model
        )
        ivf_build = time.perf_counter() - t0
        ivf = Searcher(work / "ivf", model=model)
        for nprobe in (8, 32):
            approx = ivf.search(code, top_k=10, path="dense", nprobe=nprobe).ids
            fn = lambda q, nprobe=nprobe: ivf.search(head(q), top_k=10, path="dense", nprobe=nprobe)  # noqa: E731
            for batch in (1, 256):
                t = timed(fn, xq_raw, batch, 256 if batch == 1 else 1024, budget)
                rows.append(
                    {
                        "n": n,
                        "method": f"sparc dense IVF{nlist} nprobe={nprobe}",
                        "batch": batch,
                        **t,
                        "recall@10": recall_at(approx, exact["dense"]),
                        "mem_B/item": np.nan,
                        "disk_B/item": np.nan,
                        "build_s": ivf_build,
                        "build_items/s": n / ivf_build,
                    }
                )
    # Baseline: exact inner product over the raw CLIP image features, queried with raw CLIP text.
    xb = np.load(base_path, mmap_mode="r")
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(xb.shape[1])
    for a in range(0, n, 200_000):
        flat.add(np.ascontiguousarray(xb[a : a + 200_000]))
    base_build = time.perf_counter() - t0
    for batch in (1, 256):
        t = timed(lambda q: flat.search(np.ascontiguousarray(q), 10), xq_raw, batch, 64 if batch == 1 else 512, budget)
        rows.append(
            {
                "n": n,
                "method": "baseline FAISS Flat raw CLIP 768-d",
                "batch": batch,
                **t,
                "recall@10": 1.0,
                "mem_B/item": 4 * xb.shape[1] + 8,
                "disk_B/item": 4 * xb.shape[1] + 8,
                "build_s": base_build,
                "build_items/s": n / base_build,
            }
        )
    base_qps = {r["batch"]: r["qps"] for r in rows if r["method"].startswith("baseline")}
    for r in rows:
        r["x_baseline_qps"] = r["qps"] / base_qps[r["batch"]]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/demo/sparc", help="a checkpoint trained on the demo's synthetic data")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--budget", type=float, default=10.0, help="seconds per timing cell at most")
    p.add_argument("--no-ivf", dest="ivf", action="store_false")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed after)")
    args = p.parse_args()
    model = load_checkpoint(args.checkpoint)
    print(
        f"checkpoint {args.checkpoint}: n_latents {model.n_latents}, k {model.k}; faiss {faiss.__version__}; "
        f"threads {faiss.omp_get_max_threads()}"
    )
    header = [
        "n",
        "method",
        "batch",
        "qps",
        "x_baseline_qps",
        "p50_ms",
        "p99_ms",
        "recall@10",
        "mem_B/item",
        "disk_B/item",
        "build_s",
        "build_items/s",
    ]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for n in (int(x) for x in args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"sparc-bench-{n}-", dir=args.workdir))
        try:
            for r in run_size(n, args, model, work):
                cells = []
                for h in header:
                    v = r[h]
                    cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
                print(" | ".join(cells), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
