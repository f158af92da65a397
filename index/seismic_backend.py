"""Approximate sparse search with Seismic (pyseismic-lsr): an index per bundle part, searched per call with
``query_cut`` (how many of the query's largest entries are used) and ``heap_factor`` (how eagerly blocks
of a posting list are skipped: higher skips more, faster and less exact).

Seismic stores values as float16 and answers with its own score estimates, so the candidates it returns are
rescored exactly from the part's stored codes and re-ranked. Its batch call reads queries from a file and
its threads come from RAYON_NUM_THREADS; the searcher instead calls its single-query search (which releases
the GIL) on our own thread pool, so results are in input order and the thread count is ours.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sparc_core import SparcError
from sparc_core.extras import require

INDEX_FILE = "seismic.index"


class SeismicSettings(BaseModel):
    """How a bundle's Seismic indexes were built, and the per-call defaults."""

    model_config = ConfigDict(extra="forbid")
    kind: str = "seismic"
    n_postings: int = Field(0, ge=0)  # entries kept per posting list on average; 0: the part's mean list length
    summary_energy: float = Field(0.4, gt=0, le=1)  # share of a block's mass its summary keeps
    centroid_fraction: float = Field(0.1, gt=0, le=1)  # blocks per posting list, as a share of its entries
    query_cut: int = Field(0, ge=0)  # default per call: the query's largest entries used (0: all)
    heap_factor: float = Field(0.9, gt=0, le=1)  # default per call (bench/index_scale.py: recall vs speed)


ApproxSettings = SeismicSettings  # the earlier name


class SeismicError(SparcError, RuntimeError):
    """Seismic is missing, or its index cannot be built or read."""


ApproxError = SeismicError  # the earlier name


def _seismic() -> Any:
    return require("seismic", "seismic", "Seismic indexes (the seismic path)", SeismicError, " (pyseismic-lsr)")


def write_inner_format(path: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """Codes in Seismic's binary format: [n u32], then per item [nnz u32][latents u32 ascending][values f32];
    returns (items, active entries)."""
    n = total = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<I", 0))
        for idx, val in chunks:
            val = np.asarray(val, dtype=np.float32)
            idx = np.asarray(idx, dtype=np.int64)
            order = np.argsort(np.where(val > 0, idx, np.iinfo(np.int64).max), axis=1, kind="stable")
            idx, val = np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)
            nnz = (val > 0).sum(1)
            total += int(nnz.sum())
            buf = bytearray()
            for i in range(len(idx)):
                m = int(nnz[i])
                buf += struct.pack("<I", m) + idx[i, :m].astype("<u4").tobytes() + val[i, :m].astype("<f4").tobytes()
            f.write(buf)
            n += len(idx)
        f.seek(0)
        f.write(struct.pack("<I", n))
    return n, total


def build_part_index(
    part_dir: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], settings: SeismicSettings, n_latents: int
) -> None:
    """Build and save a part's Seismic index (``seismic.index``) from its codes."""
    seismic = _seismic()
    tmp = part_dir / ".seismic-input.bin"
    try:
        _, nnz = write_inner_format(tmp, chunks)
        # Seismic keeps about n_postings entries per list; its own default (3500) prunes a 10M-item gallery's
        # lists to a tenth and loses half the top 10 (bench/index_scale.py), so the default scales with the part.
        n_postings = settings.n_postings or max(1, -(-nnz // n_latents))
        kw: dict[str, Any] = {"summary_energy": settings.summary_energy, "centroid_fraction": settings.centroid_fraction,
                              "n_postings": n_postings}  # fmt: skip
        index = seismic.SeismicIndexRaw.build(str(tmp), **kw)
        index.save(str(part_dir / INDEX_FILE))
        with open(part_dir / INDEX_FILE, "rb+") as f:
            os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)


def load_part_index(part_dir: Path) -> Any:
    """A part's saved Seismic index."""
    seismic = _seismic()
    path = part_dir / INDEX_FILE
    try:
        return seismic.SeismicIndexRaw.load(str(path))
    except BaseException as e:  # a Rust panic arrives as a BaseException subclass
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise SeismicError(f"{path}: unreadable Seismic index ({e})") from None


def search_one(
    index: Any, codes_idx: np.ndarray, codes_val: np.ndarray, lat: np.ndarray, w: np.ndarray, k: int, query_cut: int,
    heap_factor: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One query (active latents, weights) -> (exact scores, local rows) of Seismic's candidates, best first.
    Seismic picks candidates with the positive weights; a negative weight (a boost) enters the exact
    rescoring only (and twice the candidates are asked for, since it may push some out)."""
    inside = lat < index.dim  # latents no item has active: Seismic refuses them, they match nothing
    lat, w = lat[inside], w[inside]
    up = w > 0
    if not up.any():
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    order = np.argsort(lat)  # Seismic requires ascending components
    lat, w, up = lat[order].astype(np.int32), w[order].astype(np.float32), up[order]
    cut = int(up.sum()) if query_cut <= 0 else min(query_cut, int(up.sum()))
    want = k if up.all() else 2 * k
    try:
        found = index.search(lat[up], w[up], want, cut, float(heap_factor), 0, True)
    except BaseException as e:  # a Rust panic arrives as a BaseException subclass
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise SeismicError(f"Seismic search failed: {e}") from None
    rows = np.array(sorted(r for _, r in found), dtype=np.int64)
    if not len(rows):
        return np.zeros(0, np.float32), rows
    ci, cv = np.asarray(codes_idx[rows], dtype=np.int64), np.asarray(codes_val[rows], dtype=np.float32)
    pos = np.minimum(np.searchsorted(lat, ci), len(lat) - 1)
    weight = np.where(lat[pos] == ci, w[pos], 0.0)
    scores = (weight * cv).sum(1)  # exact, from the stored codes (Seismic scores in float16)
    keep = scores > 0
    rows, scores = rows[keep], scores[keep]
    best = np.lexsort((rows, -scores))[:k]
    return scores[best].astype(np.float32), rows[best]
