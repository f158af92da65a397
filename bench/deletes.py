"""Deletes against a fresh build: after deleting a random 10% of the items, does every path answer as a
bundle built without them would, and does a compaction restore a fresh build's bytes per item?

Codes: the ``topics`` world of index/synthetic_codes.py (items share half their latents with one of n/100
topics, so queries have true neighbours), 8,192 latents, L0 64; 200 distinct queries drawn the same way.
Three bundles: the full build with 10% deleted (tombstones), the same after ``compact_bundle``, and a fresh
build of the remaining 90%. Exact (sparse) top-10 is compared id for id; the approximate paths (ours at
its default budget, and Seismic when installed) by recall@10 against each bundle's own exact top-10 (a
hit counts when its true score reaches the 10th true score).

    python bench/deletes.py [--n 200000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from index.bundle import Bundle, add_seismic_index, build_bundle_from_codes, compact_bundle, delete_items
from index.manifest import current_version
from index.synthetic_codes import latent_probabilities, topic_codes

N_LATENTS, K = 8192, 64


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """recall@10 of approximate scores against the exact ones (ties at the 10th score are not misses)."""
    hits = [(f >= t[-1] - 1e-4).sum() for f, t in zip(found, truth)]
    return float(np.mean(np.minimum(hits, 10)) / 10)


def brute_force_top10(idx: np.ndarray, val: np.ndarray, qi: np.ndarray, qv: np.ndarray) -> np.ndarray:
    """Top-10 scores of every query over the items' codes, in numpy (the baseline, independent of the index)."""
    vals = val.astype(np.float32)
    out = np.zeros((len(qi), 10), dtype=np.float32)
    for q in range(len(qi)):
        dense = np.zeros(N_LATENTS, dtype=np.float32)
        np.add.at(dense, qi[q], qv[q])
        scores = np.zeros(len(idx), dtype=np.float32)
        for a in range(0, len(idx), 65_536):
            scores[a : a + 65_536] = (dense[idx[a : a + 65_536]] * vals[a : a + 65_536]).sum(1)
        out[q] = np.sort(scores)[::-1][:10]
    return out


def bytes_per_item(path: Path, n: int) -> float:
    return sum(f.stat().st_size for f in current_version(path).rglob("*") if f.is_file()) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="sparc-deletes-"))
    p = latent_probabilities(N_LATENTS, 1.0, seed=0)
    idx, val = topic_codes(args.n, K, p, max(1, args.n // 100), seed=1)
    qi, qv = topic_codes(200, K, p, max(1, args.n // 100), seed=99)
    qi, qv = qi.astype(np.int64), qv.astype(np.float32)
    gone = np.sort(np.random.default_rng(0).choice(args.n, size=args.n // 10, replace=False))
    keep = np.setdiff1d(np.arange(args.n), gone)
    build_bundle_from_codes(work / "deleted", [(idx, val)], args.n, K, N_LATENTS, progress=False)
    delete_items(work / "deleted", gone)
    build_bundle_from_codes(
        work / "fresh", [(idx[keep], val[keep])], len(keep), K, N_LATENTS, ids=keep.astype(np.int64), progress=False
    )
    import shutil

    shutil.copytree(work / "deleted", work / "compacted")
    compact_bundle(work / "compacted", progress=False)
    seismic = True
    try:
        for name in ("deleted", "fresh", "compacted"):
            add_seismic_index(work / name)
    except Exception as e:  # noqa: BLE001 - an extra: the other rows still print
        print(f"Seismic rows skipped ({type(e).__name__}: {e})")
        seismic = False
    truth = brute_force_top10(idx[keep].astype(np.int64), val[keep], qi, qv)
    print(f"{args.n:,} items, {len(gone):,} deleted (10%), 200 queries, top 10\n")
    print(
        "| bundle | exact top-10 scores = numpy brute force over the live items | exact top-10 ids = fresh build's "
        "| recall@10 approx (default budget) | recall@10 seismic | bytes / live item |"
    )
    print("|---|---|---|---|---|---|")
    fresh_exact = None
    for name in ("fresh", "deleted", "compacted"):
        b = Bundle(work / name)
        D, I = b.search_sparse(qi, qv, 10)
        ids = np.array([[b.id_at(r) if r >= 0 else -1 for r in row] for row in I])
        if fresh_exact is None:
            fresh_exact = (D, ids)
        same = bool(np.array_equal(ids, fresh_exact[1]) and np.allclose(D, fresh_exact[0], atol=1e-6))
        Da, _ = b.search_approx(qi, qv, 10)
        ra = recall(Da, D)
        rs = "-"
        if seismic:
            Ds, _ = b.search_seismic(qi, qv, 10)
            rs = f"{recall(Ds, D):.3f}"
        brute = bool(np.allclose(D, truth, atol=2e-3))  # float16 values summed in another order
        print(
            f"| {name} | {'yes' if brute else 'no'} | {'yes' if same else 'no'} | {ra:.3f} | {rs} "
            f"| {bytes_per_item(work / name, b.n_live):.1f} |"
        )


if __name__ == "__main__":
    main()
