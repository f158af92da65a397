"""Checks that make a bundle safe to hand to the compiled kernels, run once when a version is opened.

Two layers, both streamed (bounded memory, O(file size) once):

- **content checksums**: the manifest records each file's CRC-32 (bundles written since the field exists);
  a file whose bytes changed after the build (bit rot, a partial copy, an edit) is refused before any of it
  is parsed, so a damaged FAISS or Seismic file never reaches its native reader;
- **structure**: what the kernels read unchecked must hold whatever the manifest says, so a file written
  wrongly (by another tool, an old bug, a hand) with a consistent manifest is refused too: latent ids
  within ``[0, n_latents)``, finite non-negative values, posting rows below their block's row count,
  posting values positive finite float16, id rows within ``[0, n)``, id keys sorted and
  matching the ids, string offsets monotone inside the blob and on UTF-8 boundaries of valid UTF-8.

Every failure is a BundleError naming the file and the problem.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError
from .postings_format import BLOCK

CHUNK_BYTES = 1 << 22  # bytes read at a time when summing a file
ROWS = BLOCK  # rows checked at a time
PLAIN_FILE = re.compile(r"^(part-[0-9]{5,}/)?[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a version's file, never a path elsewhere


def checksum(path: Path) -> str:
    """The CRC-32 of a file's bytes, read in chunks: ``crc32:xxxxxxxx``."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            crc = zlib.crc32(block, crc)
    return f"crc32:{crc:08x}"


def check_file_name(name: str) -> str:
    """A manifest file key must name a file inside the version: ``NAME`` or ``part-NNNNN/NAME``."""
    if not PLAIN_FILE.match(name) or ".." in name.split("/"):
        raise ValueError(f"file key {name!r} is not a plain file name inside the version")
    return name


def verify_files(vdir: Path, files: dict[str, int], checksums: dict[str, str]) -> None:
    """Every file the manifest lists exists with its size, and its checksum where one is recorded."""
    for name, size in files.items():
        f = vdir / name
        if not f.is_file():
            raise BundleError(f"{f}: missing")
        if f.stat().st_size != size:
            raise BundleError(f"{f}: {f.stat().st_size} bytes, manifest says {size} (truncated or corrupt)")
    for name, want in checksums.items():
        if name not in files:
            raise BundleError(f"{vdir / name}: has a checksum in the manifest but is not among its files")
        have = checksum(vdir / name)
        if have != want:
            raise BundleError(f"{vdir / name}: content checksum {have}, manifest says {want} (the file changed after its build)")


def _chunks(n: int, step: int = ROWS) -> range:
    return range(0, n, step)


def check_codes(where: Path, codes_idx: np.ndarray, codes_val: np.ndarray, n_latents: int) -> None:
    """Latent ids integers in ``[0, n_latents)``; values finite and >= 0."""
    if codes_idx.dtype.kind not in "iu":
        raise BundleError(f"{where / 'codes_idx.npy'}: dtype {codes_idx.dtype}, expected integer latent ids")
    if codes_val.dtype.kind != "f":
        raise BundleError(f"{where / 'codes_val.npy'}: dtype {codes_val.dtype}, expected float values")
    for a in _chunks(len(codes_idx)):
        idx = np.asarray(codes_idx[a : a + ROWS])
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n_latents):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            raise BundleError(f"{where / 'codes_idx.npy'}: latent id {bad} outside [0, {n_latents})")
        val = np.asarray(codes_val[a : a + ROWS])
        if val.size and not (np.isfinite(val).all() and float(val.min()) >= 0):
            raise BundleError(f"{where / 'codes_val.npy'}: values must be finite and >= 0")


def check_postings(where: Path, postings: Any, n_items: int, codes_val: np.ndarray | None = None) -> None:
    """Each block's posting rows below the block's row count; values positive finite float16 bits. With the
    part's ``codes_val``, each row is in as many posting lists as its code has active latents (the postings
    are built from those codes): a row id replaced by another valid one is caught too."""
    offsets, items, values, L = postings.offsets, postings.items, postings.values, postings.n_latents
    for b in range(postings.n_blocks):
        a, e = int(offsets[b * L]), int(offsets[(b + 1) * L])
        rows_in_block = min(BLOCK, n_items - b * BLOCK)
        seen = np.zeros(rows_in_block, dtype=np.int64)
        for s in range(a, e, 1 << 22):
            t = min(e, s + (1 << 22))
            it = np.asarray(items[s:t])
            if it.size and int(it.max()) >= rows_in_block:
                raise BundleError(
                    f"{where / 'post_items.bin'}: row {int(it.max())} in block {b}, which holds {rows_in_block} rows"
                )
            v = np.asarray(values[s:t])
            if v.size and (int(v.min()) == 0 or int(v.max()) >= 0x7C00):  # float16 bits of (0, inf)
                raise BundleError(f"{where / 'post_values.bin'}: a value that is not a positive finite float16")
            if codes_val is not None:
                seen += np.bincount(it, minlength=rows_in_block)
        if codes_val is not None:
            cv = np.asarray(codes_val[b * BLOCK : b * BLOCK + rows_in_block])
            # values are checked finite and >= 0, so a float16 is active unless its bits are +0 or -0 (a 4x
            # faster count than comparing float16s)
            want = np.count_nonzero(cv.view(np.uint16) & 0x7FFF, axis=1) if cv.dtype == np.float16 else (cv > 0).sum(1)
            if not np.array_equal(seen, want):
                row = b * BLOCK + int(np.flatnonzero(seen != want)[0])
                raise BundleError(
                    f"{where / 'post_items.bin'}: row {row} is in {int(seen[row - b * BLOCK])} posting lists, "
                    f"its code has {int(want[row - b * BLOCK])} active latents"
                )


def check_ids(where: Path, ids: Any, n: int) -> None:
    """Rows within ``[0, n)``, keys sorted and equal to the keys of the ids at those rows, string offsets
    rising inside the blob on character starts, the blob valid UTF-8."""
    from .ids import string_keys

    rows, keys = ids.rows, ids.keys
    if len(rows) != n or len(keys) != n:
        raise BundleError(f"{where}: {len(keys)} id keys and {len(rows)} id rows for {n} items")
    if rows.dtype.kind not in "iu" or keys.dtype != np.uint64:
        raise BundleError(f"{where}: id keys must be uint64 and id rows integers (got {keys.dtype}, {rows.dtype})")
    if ids.kind == "int":
        values = ids.values
        if values.dtype != np.int64 or len(values) != n:
            raise BundleError(f"{where / 'ids.npy'}: {len(values)} ids of dtype {values.dtype}, expected {n} int64")

        def raw_of(r: np.ndarray) -> np.ndarray:
            return np.asarray(values[r]).view(np.uint64)
    else:
        blob, offsets = ids.blob, np.asarray(ids.offsets)
        if blob.dtype != np.uint8 or offsets.dtype != np.int64 or len(offsets) != n + 1:
            raise BundleError(f"{where}: string ids need a uint8 blob and {n + 1} int64 offsets")
        if int(offsets[0]) != 0 or int(offsets[-1]) != len(blob) or bool((np.diff(offsets) < 0).any()):
            raise BundleError(f"{where / 'ids_offsets.npy'}: offsets must rise from 0 to the blob's {len(blob)} bytes")
        starts = offsets[:-1][offsets[:-1] < len(blob)]
        if bool(((np.asarray(blob[starts]) & 0xC0) == 0x80).any()):
            raise BundleError(f"{where / 'ids_offsets.npy'}: an id starts inside a UTF-8 character")
        for s in range(0, len(blob), CHUNK_BYTES):  # chunks cut on character starts: each valid alone
            t = min(len(blob), s + CHUNK_BYTES)
            while t < len(blob) and (int(blob[t]) & 0xC0) == 0x80:
                t += 1
            try:
                bytes(blob[s:t]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BundleError(
                    f"{where / 'ids_utf8.npy'}: ids are not valid UTF-8 ({e.reason} at byte {s + e.start})"
                ) from None
        raw = string_keys(blob, offsets)

        def raw_of(r: np.ndarray) -> np.ndarray:
            return raw[r]

    last = None
    for a in _chunks(n, 1 << 20):
        r = np.asarray(rows[a : a + (1 << 20)]).astype(np.int64)
        if int(r.min()) < 0 or int(r.max()) >= n:
            raise BundleError(
                f"{where / 'id_rows.npy'}: row {int(r.min()) if int(r.min()) < 0 else int(r.max())} outside [0, {n})"
            )
        k = np.asarray(keys[a : a + (1 << 20)])
        if bool((k[1:] < k[:-1]).any()) or (last is not None and k[0] < last):
            raise BundleError(f"{where / 'id_keys.npy'}: keys are not sorted")
        last = k[-1]
        if not np.array_equal(raw_of(r), k):
            raise BundleError(f"{where / 'id_keys.npy'}: keys do not match the ids (corrupt id index)")


__all__ = ["check_codes", "check_file_name", "check_ids", "check_postings", "checksum", "verify_files"]
