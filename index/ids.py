"""Item ids of one index part, looked up without a Python object per item.

Integer ids are an int64 array. String ids are one UTF-8 blob plus int64 offsets (no fixed-width unicode
array sized by the longest id). Lookup uses a key index written at build time: each id's 64-bit key (the
integer itself, or FNV-1a of the UTF-8 bytes) sorted, with the row of each key; a lookup is a binary search
(and, for strings, a byte comparison of the few rows sharing the key). Everything is read-only numpy, so
lookups are thread-safe and memory-mapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _fnv1a(blob, offsets, out):  # pragma: no cover - compiled
    for i in range(out.shape[0]):
        h = np.uint64(0xCBF29CE484222325)
        for p in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(blob[p])) * np.uint64(0x100000001B3)
        out[i] = h


def encode_strings(ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 blob uint8, offsets int64 [n + 1]) of a sequence of strings."""
    parts = [str(s).encode("utf-8") for s in ids]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), offsets


def string_keys(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a keys of the strings in a blob."""
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    _fnv1a(np.asarray(blob, dtype=np.uint8), np.asarray(offsets, dtype=np.int64), out)
    return out


def keys_of(ids: Any, kind: str) -> np.ndarray:
    """Lookup keys (uint64) of ids given as Python values or an array."""
    if kind == "int":
        return np.asarray(ids, dtype=np.int64).view(np.uint64)
    blob, offsets = encode_strings(ids)
    return string_keys(blob, offsets)


class ItemIds:
    """The ids of one part: ``at(row)``, ``take(rows)``, ``find(ids)``; ints or strings."""

    def __init__(
        self,
        kind: str,
        n: int,
        values: np.ndarray | None = None,
        blob: np.ndarray | None = None,
        offsets: np.ndarray | None = None,
        keys: np.ndarray | None = None,
        rows: np.ndarray | None = None,
    ) -> None:
        self.kind, self.n = kind, int(n)
        self.values, self.blob, self.offsets = values, blob, offsets
        if keys is None:  # built in memory (legacy bundles, tests)
            raw = self.values.view(np.uint64) if kind == "int" else string_keys(self.blob, self.offsets)
            rows = np.argsort(raw, kind="stable")
            keys = raw[rows]
        self.keys, self.rows = keys, rows

    @classmethod
    def from_array(cls, ids: np.ndarray) -> ItemIds:
        """Ids from an int or str numpy array (in memory)."""
        if ids.dtype.kind in "iu":
            return cls("int", len(ids), values=np.asarray(ids, dtype=np.int64))
        blob, offsets = encode_strings(ids.tolist())
        return cls("str", len(ids), blob=blob, offsets=offsets)

    def __len__(self) -> int:
        return self.n

    def at(self, row: int) -> Any:
        """The id of one row (int or str)."""
        if self.kind == "int":
            return int(self.values[row])
        a, b = int(self.offsets[row]), int(self.offsets[row + 1])
        return bytes(self.blob[a:b]).decode("utf-8")

    def take(self, rows: Any) -> list[Any]:
        """Ids of several rows, as Python values."""
        if self.kind == "int":
            return np.asarray(self.values[np.asarray(rows, dtype=np.int64)]).tolist()
        return [self.at(int(r)) for r in rows]

    def tolist(self) -> list[Any]:
        return self.take(np.arange(self.n))

    def find(self, ids: Any) -> np.ndarray:
        """Row of each id (-1 where absent)."""
        ids = list(ids)
        if self.kind == "int":
            try:
                wanted = [int(x) for x in ids]
            except (TypeError, ValueError):
                return np.full(len(ids), -1, dtype=np.int64)
            q = np.asarray(wanted, dtype=np.int64).view(np.uint64)
        else:
            ids = [str(x) for x in ids]
            q = keys_of(ids, "str")
        keys = self.keys
        lo = np.searchsorted(keys, q, side="left")
        if self.kind == "int":  # the key is the id: equal keys are the answer, vectorised
            hit = lo < self.n
            hit[hit] = np.asarray(keys[lo[hit]]) == q[hit]
            out = np.full(len(q), -1, dtype=np.int64)
            out[hit] = np.asarray(self.rows)[lo[hit]]
            return out
        out = np.full(len(q), -1, dtype=np.int64)
        for i in range(len(q)):
            j = int(lo[i])
            while j < self.n and keys[j] == q[i]:  # strings: a key may be shared by a few ids
                r = int(self.rows[j])
                if self.at(r) == ids[i]:
                    out[i] = r
                    break
                j += 1
        return out

    def duplicates(self, limit: int = 5) -> list[Any]:
        """Ids that occur more than once (at most ``limit``)."""
        same = np.flatnonzero(self.keys[1:] == self.keys[:-1])
        found: list[Any] = []
        for j in same:
            a, b = self.at(int(self.rows[j])), self.at(int(self.rows[j + 1]))
            if a == b and a not in found:
                found.append(a)
                if len(found) >= limit:
                    break
        return found


def write_ids(directory: Path, ids: np.ndarray, save: Any) -> str:
    """Write a part's ids (``save(path, array)`` writes one fsynced .npy); returns the kind."""
    if ids.dtype.kind in "iu":
        values = np.asarray(ids, dtype=np.int64)
        raw = values.view(np.uint64)
        save(directory / "ids.npy", values)
        kind = "int"
    else:
        blob, offsets = encode_strings(ids.tolist() if isinstance(ids, np.ndarray) else ids)
        raw = string_keys(blob, offsets)
        save(directory / "ids_utf8.npy", blob)
        save(directory / "ids_offsets.npy", offsets)
        kind = "str"
    rows = np.argsort(raw, kind="stable")
    save(directory / "id_keys.npy", raw[rows])
    save(directory / "id_rows.npy", rows.astype(np.int32 if len(rows) < 2**31 else np.int64))
    return kind


def read_ids(directory: Path, kind: str, n: int, mmap: bool = True) -> ItemIds:
    """A part's ids as written by ``write_ids``."""
    mode = "r" if mmap else None

    def load(name: str) -> np.ndarray:
        return np.load(directory / name, mmap_mode=mode, allow_pickle=False)

    keys, rows = load("id_keys.npy"), load("id_rows.npy")
    if kind == "int":
        return ItemIds("int", n, values=load("ids.npy"), keys=keys, rows=rows)
    return ItemIds("str", n, blob=load("ids_utf8.npy"), offsets=load("ids_offsets.npy"), keys=keys, rows=rows)


__all__ = ["ItemIds", "encode_strings", "keys_of", "read_ids", "string_keys", "write_ids"]
