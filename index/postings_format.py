"""The on-disk (and in-memory) layout of block posting lists, its writer and its reader.

Items are cut into blocks of BLOCK rows; inside a block each latent has a list of (row in block: uint16,
value: float16 bits), ordered by value, largest first (ties: lower row first). A part directory holds
``post_offsets.npy`` (int64, n_blocks x n_latents + 1), ``post_items.bin`` and ``post_values.bin`` (raw
uint16) and ``post_hist.npy`` (each latent's value histogram; absent in parts written before the lists
were value-ordered).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

BLOCK = 1 << 16  # rows per block: local row numbers fit uint16, a block's score buffer fits the L2 cache
HIST_BINS = 128  # value histogram bins per latent: float16 bits >> 8 (4 bins per octave; positive halves < 0x7C00)


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


def read_postings(directory: Path, mmap: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(offsets, items, values, histogram or None) as a PostingsWriter wrote them into ``directory``
    (memory-mapped read-only by default)."""
    offsets = np.load(directory / "post_offsets.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def raw(name: str) -> np.ndarray:
            f = directory / name
            if f.stat().st_size == 0:
                return np.zeros(0, dtype=np.uint16)
            return np.memmap(f, dtype=np.uint16, mode="r") if mmap else np.fromfile(f, dtype=np.uint16)

        hist_file = directory / "post_hist.npy"  # present: the lists are value-ordered
        hist = np.load(hist_file, allow_pickle=False) if hist_file.exists() else None
        return offsets, raw("post_items.bin"), raw("post_values.bin"), hist
