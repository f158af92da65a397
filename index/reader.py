"""Reading a bundle: its parts (ids, codes, posting lists, optional FAISS and Seismic indexes), addressed as
one list of rows and searched part by part (the results merged)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, SearchStopped
from .faiss_backend import read_dense_index
from .ids import ItemIds, read_ids
from .kernels import merge_topk
from .manifest import LEGACY_ARRAYS, MANIFEST, current_version, read_manifest, require_checkpoint
from .params import ApproxParams, SearchPath, SeismicParams
from .postings import BLOCK, Postings, _pool, load_postings, search_threads
from .seismic_backend import load_part_index, search_one
from .validate import check_codes, check_ids, check_postings, verify_files


class Part:
    """One part of a loaded bundle: its ids, codes, postings and optional FAISS index; rows from ``row0``."""

    def __init__(self, name: str, row0: int, ids: ItemIds, codes_idx: np.ndarray, codes_val: np.ndarray,
                 postings: Postings, dense_index: Any | None, seismic_index: Any | None = None,
                 deleted: np.ndarray | None = None) -> None:  # fmt: skip
        self.name, self.row0, self.ids = name, row0, ids
        self.codes_idx, self.codes_val, self.postings, self.dense_index = codes_idx, codes_val, postings, dense_index
        self.seismic_index = seismic_index
        self.deleted = np.zeros(0, dtype=np.int64) if deleted is None else np.asarray(deleted, dtype=np.int64)
        self.alive: np.ndarray | None = None  # row -> not deleted (only when some are)
        if len(self.deleted):
            self.alive = np.ones(len(ids), dtype=bool)
            self.alive[self.deleted] = False

    @property
    def n_items(self) -> int:
        """Rows in the part, deleted ones included (row numbers)."""
        return len(self.ids)

    @property
    def n_live(self) -> int:
        return len(self.ids) - len(self.deleted)

    def live(self, rows: np.ndarray) -> np.ndarray:
        """Whether each local row is not deleted."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.ones(rows.shape, dtype=bool) if self.alive is None else self.alive[rows]


def drop_deleted(D: np.ndarray, I: np.ndarray, part: Part, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A part's over-fetched results (local rows, -1 = none) without its deleted rows, the best ``k`` kept."""
    if part.alive is None:
        return D[:, :k], I[:, :k]
    outD = np.full((len(D), k), -np.inf, dtype=np.float32)
    outI = np.full((len(I), k), -1, dtype=np.int64)
    for q in range(len(D)):
        keep = np.flatnonzero((I[q] >= 0) & part.alive[np.maximum(I[q], 0)])[:k]
        outD[q, : len(keep)], outI[q, : len(keep)] = D[q, keep], I[q, keep]
    return outD, outI


class Bundle:
    """A loaded bundle (one shard): its parts, searched and addressed as one list of rows."""

    def __init__(self, path: str | Path, expected_checkpoint: str | None = None, mmap: bool = True, verify: bool = True) -> None:
        """``verify``: check every file's checksum and the structure the kernels rely on (index/validate.py)
        before serving; off only for a bundle this process has just checked or written itself."""
        self.path = Path(path)
        self.verify = verify
        self.vdir = current_version(self.path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if expected_checkpoint is not None:
            require_checkpoint(m.checkpoint_sha256, expected_checkpoint, self.vdir / MANIFEST)
        verify_files(self.vdir, m.files, m.checksums if verify else {})
        self.parts = self._load_legacy(mmap) if m.version == 1 else self._load_parts(mmap)
        if sum(p.n_items for p in self.parts) != m.n_items:
            raise BundleError(f"{self.vdir}: parts hold {sum(p.n_items for p in self.parts)} items, manifest says {m.n_items}")
        self._row0 = np.array([p.row0 for p in self.parts], dtype=np.int64)
        self.n_live = sum(p.n_live for p in self.parts)  # items not deleted

    def _load_parts(self, mmap: bool) -> list[Part]:
        m, parts, row0 = self.manifest, [], 0
        for info in m.parts:
            d = self.vdir / info.name
            n = info.n_items
            try:
                ids = read_ids(d, m.id_kind, n, mmap)
                codes_idx = np.load(d / "codes_idx.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                codes_val = np.load(d / "codes_val.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                postings = load_postings(d, n, m.n_latents, mmap)
            except (ValueError, OSError, EOFError) as e:
                raise BundleError(f"{d}: unreadable part ({e})") from None
            if codes_idx.shape != (n, m.k) or codes_val.shape != (n, m.k) or len(ids.keys) != n:
                raise BundleError(f"{d}: array shapes do not match the manifest's {n} items x k={m.k}")
            if self.verify:
                check_codes(d, codes_idx, codes_val, m.n_latents)
                check_postings(d, postings, n, codes_val)
                check_ids(d, ids, n)
            dense = read_dense_index(d / "dense.faiss") if m.dense else None
            if dense is not None and dense.ntotal != n:
                raise BundleError(f"{d / 'dense.faiss'}: holds {dense.ntotal} vectors, manifest says {n}")
            seismic = load_part_index(d) if m.seismic is not None else None
            deleted = self._deleted(d, n, info.n_deleted)
            parts.append(Part(info.name, row0, ids, codes_idx, codes_val, postings, dense, seismic, deleted))
            row0 += n
        return parts

    @staticmethod
    def _deleted(d: Path, n: int, expected: int) -> np.ndarray | None:
        """A part's tombstones: sorted, unique local rows in [0, n), as many as the manifest says."""
        f = d / "deleted.npy"
        if not f.is_file():
            if expected:
                raise BundleError(f"{f}: missing (the manifest says {expected} rows are deleted)")
            return None
        try:
            rows = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BundleError(f"{f}: unreadable ({e})") from None
        ok = rows.ndim == 1 and rows.dtype.kind in "iu" and len(rows) == expected
        if ok and len(rows):
            ok = int(rows[0]) >= 0 and int(rows[-1]) < n and bool((np.diff(rows) > 0).all())
        if not ok:
            raise BundleError(f"{f}: expected {expected} sorted, unique rows in [0, {n})")
        return rows

    def _load_legacy(self, mmap: bool) -> list[Part]:
        m, arr = self.manifest, {}
        for name in LEGACY_ARRAYS:
            f = self.vdir / f"{name}.npy"
            try:
                arr[name] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise BundleError(f"{f}: unreadable ({e})") from None
        n = m.n_items
        if len(arr["ids"]) != n or arr["codes_idx"].shape != (n, m.k) or arr["codes_val"].shape != (n, m.k):
            raise BundleError(f"{self.vdir}: array shapes do not match the manifest's {n} items x k={m.k}")
        if arr["ids"].dtype.kind not in "iuU":
            raise BundleError(f"{self.vdir / 'ids.npy'}: dtype {arr['ids'].dtype}, expected integer or string ids")
        check_codes(self.vdir, arr["codes_idx"], arr["codes_val"], m.n_latents)
        postings = Postings.from_codes(np.asarray(arr["codes_idx"]), np.asarray(arr["codes_val"]), m.n_latents)
        dense = read_dense_index(self.vdir / "dense.faiss") if m.dense else None
        if dense is not None and dense.ntotal != n:
            raise BundleError(f"{self.vdir / 'dense.faiss'}: holds {dense.ntotal} vectors, manifest says {n}")
        ids = ItemIds.from_array(np.asarray(arr["ids"]))
        return [Part(".", 0, ids, arr["codes_idx"], arr["codes_val"], postings, dense)]

    # ---- rows and ids -----------------------------------------------------------------------------
    def _split(self, rows: np.ndarray) -> Iterator[tuple[Part, np.ndarray, np.ndarray]]:
        """(part, positions in ``rows``, local rows) for each part that holds some of ``rows``."""
        which = self.part_at(rows)
        for pi in np.unique(which):
            sel = np.flatnonzero(which == pi)
            part = self.parts[int(pi)]
            yield part, sel, rows[sel] - part.row0

    def part_at(self, rows: Any) -> np.ndarray:
        """The part (its position in ``parts``) that holds each row."""
        return np.searchsorted(self._row0, np.asarray(rows, dtype=np.int64), side="right") - 1

    def ids_at(self, rows: Any) -> list[Any]:
        """Ids of rows (Python ints or strs)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out: list[Any] = [None] * len(rows)
        for part, sel, local in self._split(rows):
            for s, v in zip(sel.tolist(), part.ids.take(local)):
                out[s] = v
        return out

    def id_at(self, row: int) -> Any:
        return self.ids_at([row])[0]

    def row_of(self, item_id: Any) -> int:
        """Row number of an item id (KeyError if absent or deleted)."""
        for part in self.parts:
            r = int(part.ids.find([item_id])[0])
            if r >= 0 and part.live(np.array([r]))[0]:
                return part.row0 + r
        raise KeyError(item_id)

    def contains(self, ids: Any, deleted: bool = False) -> np.ndarray:
        """Whether each id is in the bundle and not deleted (with ``deleted``: deleted ones count too)."""
        ids = list(ids)
        found = np.zeros(len(ids), dtype=bool)
        for part in self.parts:
            rows = part.ids.find(ids)
            hit = rows >= 0
            if not deleted:
                hit[hit] = part.live(rows[hit])
            found |= hit
        return found

    def alive_at(self, rows: Any) -> np.ndarray:
        """Whether each row is not deleted."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.ones(len(rows), dtype=bool)
        for part, sel, local in self._split(rows):
            out[sel] = part.live(local)
        return out

    def deleted_ids(self) -> list[Any]:
        """The ids of the deleted items (tombstones not compacted yet)."""
        return [v for p in self.parts if len(p.deleted) for v in p.ids.take(p.deleted)]

    def codes(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """Stored codes of rows: (latent ids int64 [m, k], unit values float32 [m, k])."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        idx = np.zeros((len(rows), self.manifest.k), dtype=np.int64)
        val = np.zeros((len(rows), self.manifest.k), dtype=np.float32)
        for part, sel, local in self._split(rows):
            order = np.argsort(local, kind="stable")  # sorted reads from memory-mapped arrays
            idx[sel[order]] = part.codes_idx[local[order]]
            val[sel[order]] = part.codes_val[local[order]]
        return idx, val

    def iter_codes(self, chunk: int = BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, idx, val) of every item not deleted, part by part, in chunks."""
        for part in self.parts:
            for a in range(0, part.n_items, chunk):
                b = min(part.n_items, a + chunk)
                keep = part.live(np.arange(a, b))
                rows = np.arange(part.row0 + a, part.row0 + b)[keep]
                idx, val = np.asarray(part.codes_idx[a:b])[keep], np.asarray(part.codes_val[a:b], dtype=np.float32)[keep]
                yield rows, idx, val

    def all_ids(self) -> list[Any]:
        """The ids of the items not deleted."""
        out = []
        for p in self.parts:
            ids = p.ids.tolist()
            out += ids if p.alive is None else [v for v, a in zip(ids, p.alive.tolist()) if a]
        return out

    # ---- search -----------------------------------------------------------------------------------
    def search_sparse(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        require: list[int] | None = None,
        exclude: list[int] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over all parts: (D, I) with I rows of this bundle (-1 = no hit)."""
        return self._over_parts(k, lambda part, kk: part.postings.search_exact(
            q_idx, q_val, kk, require=require, exclude=exclude, should_stop=should_stop))  # fmt: skip

    def search_approx(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        params: ApproxParams | None = None,
        require: list[int] | tuple[int, ...] | None = None,
        exclude: list[int] | tuple[int, ...] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k over all parts (index/postings.py: about ``params.budget`` of each query's
        postings, highest impact first; the best ``params.candidates`` rows rescored exactly): (D, I) as
        ``search_sparse``, every score exact."""
        params = params or ApproxParams()
        return self._over_parts(k, lambda part, kk: part.postings.search_approx(
            q_idx, q_val, kk, params, part.codes_idx, part.codes_val, require=require, exclude=exclude,
            should_stop=should_stop))  # fmt: skip

    def _over_parts(self, k: int, search: Callable[[Part, int], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """``search(part, k)`` on every part, its rows made the bundle's, merged into the best k."""
        out = []
        for part in self.parts:  # a part with deletions: fetch as many more, then drop the deleted rows
            D, I = search(part, min(k + len(part.deleted), part.n_items))
            D, I = drop_deleted(D, I, part, k)
            out.append((D, np.where(I >= 0, I + part.row0, -1)))
        return merge_topk(out, k)

    def search_seismic(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        params: SeismicParams | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k (Seismic candidates, exact scores) over all parts: (D, I) as ``search_sparse``;
        ``params`` left None take the bundle's defaults."""
        a = self.manifest.seismic
        if a is None:
            raise BundleError(f"{self.path}: has no Seismic index; add one with `sparc index seismic --bundle {self.path}`")
        params = params or SeismicParams()
        cut = a.query_cut if params.query_cut is None else int(params.query_cut)
        hf = a.heap_factor if params.heap_factor is None else float(params.heap_factor)
        nq = len(q_idx)
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)

        def one(q: int) -> bool:
            if should_stop is not None and should_stop():
                return False
            on = q_val[q] != 0  # a negative weight (a boost) is rescored; zeros are padding
            found = []
            for part in self.parts:
                d, r = search_one(part.seismic_index, part.codes_idx, part.codes_val, np.asarray(q_idx[q])[on],
                                  np.asarray(q_val[q])[on], min(k + len(part.deleted), part.n_items), cut, hf)  # fmt: skip
                d, r = drop_deleted(d[None, :], r[None, :], part, k)
                found.append((d, np.where(r >= 0, r + part.row0, -1)))
            d, r = merge_topk(found, k)
            D[q], I[q] = d[0], r[0]
            return True

        done = list(_pool().map(one, range(nq))) if nq > 1 and search_threads() > 1 else [one(q) for q in range(nq)]
        if not all(done):
            raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
        return D, I

    def posting(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and values of one latent over all parts."""
        rows, vals = [], []
        for p in self.parts:
            r, v = p.postings.posting(latent)
            keep = p.live(r)
            rows.append(r[keep] + p.row0)
            vals.append(v[keep])
        return np.concatenate(rows), np.concatenate(vals)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the sparse path (postings + ids + codes) and of the dense index, as stored."""
        sparse = dense = 0
        for name, size in self.manifest.files.items():
            if name.endswith("dense.faiss"):
                dense += size
            elif name != MANIFEST:
                sparse += size
        return {SearchPath.SPARSE: sparse, SearchPath.DENSE: dense}


def shards_share_ids(bundles: list[Bundle]) -> list[Any]:
    """Ids found in more than one shard (at most 5), checked without a Python object per item: shards cut
    from one build (same source, disjoint rows, no added parts) are unique by construction."""
    ms = [b.manifest for b in bundles]
    if len(bundles) < 2:
        return []
    one_build = all(
        m.ids_unique_in_source and m.source == ms[0].source and len(m.parts) == 1 and m.shard.count == ms[0].shard.count
        for m in ms
    ) and len({m.shard.index for m in ms}) == len(ms)
    if one_build:
        return []
    found: list[Any] = []
    for a in range(len(bundles)):
        for b in range(a + 1, len(bundles)):
            for pa in bundles[a].parts:
                for pb in bundles[b].parts:
                    for s in range(0, pa.n_items, 1 << 20):
                        keys = np.asarray(pa.ids.keys[s : s + (1 << 20)])
                        pos = np.searchsorted(pb.ids.keys, keys)
                        hit = np.flatnonzero(np.asarray(pb.ids.keys)[np.minimum(pos, pb.n_items - 1)] == keys)
                        for h in hit[:5]:
                            v = pa.ids.at(int(pa.ids.rows[s + h]))
                            if pb.ids.find([v])[0] >= 0 and v not in found:
                                found.append(v)
                        if len(found) >= 5:
                            return found
    return found
