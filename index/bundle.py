"""Index bundles: build and append (the format and its versions: index/manifest.py; reading: index/reader.py).

A bundle is a directory whose ``CURRENT`` file names the live version sub-directory; a version holds one
or more parts (one per build or ``add``), each searched by the same kernel and merged::

    BUNDLE/CURRENT                          "v-20261125T101500-3f2a"
    BUNDLE/v-.../manifest.json              what was built, from which checkpoint, with which settings
    BUNDLE/v-.../part-00000/ids.npy         item ids: int64, or ids_utf8.npy + ids_offsets.npy for strings
    BUNDLE/v-.../part-00000/id_keys.npy     sorted 64-bit id keys and their rows (id_rows.npy): id lookup
    BUNDLE/v-.../part-00000/codes_idx.npy   [n, k] latent ids of every item's code (int16/int32)
    BUNDLE/v-.../part-00000/codes_val.npy   [n, k] float16 code values, L2-normalised per row
    BUNDLE/v-.../part-00000/post_*          block posting lists over latents, value-ordered, and each
                                            latent's value histogram (index/postings.py)
    BUNDLE/v-.../part-00000/dense.faiss     FAISS index over the cross-decoded space (optional)

A part is written block by block (memory bounded by one block of items, whatever the gallery size).
A new version is written completely, fsynced, and only then does ``CURRENT`` move to it with an atomic
rename; so a build killed at any point leaves the previous bundle untouched and loadable. ``add`` writes a
new version whose old parts are hard links to the previous version's files (never rewritten) plus one new
part. Bundles of format version 1 (one set of arrays per version) still load.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sparc_core import SparcModel, checkpoint_hash, load_checkpoint
from sparc_core.atomic import atomic_save_npy, fsync_dir
from sparc_core.checkpoint import pick_device
from sparc_core.data import FeatureStore
from sparc_core.model import CodeKind

from .errors import BundleError
from .faiss_backend import DenseBuilder, write_dense_index
from .ids import ItemIds, write_ids
from .manifest import (
    CURRENT,
    FORMAT,
    MANIFEST,
    NO_CHECKPOINT,
    VERSION,
    Manifest,
    PartInfo,
    ShardInfo,
    checkpoint_of,
    clean_stale_builds,
    commit_version,
    current_version,
    new_version_dir,
    read_manifest,
    relative_checkpoint,
    require_checkpoint,
)
from .postings_format import BLOCK, PostingsWriter
from .reader import Bundle, Part, shards_share_ids
from .seismic_backend import INDEX_FILE, SeismicSettings, build_part_index

ApproxSettings = SeismicSettings  # the earlier name


def load_ids(path: str | Path) -> np.ndarray:
    """Item ids from .npy (ints or strings) or a text file (one id per line)."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"{p}: ids file not found")
    if p.suffix == ".npy":
        ids = np.load(p, allow_pickle=False)
    else:
        ids = np.array(p.read_text().splitlines())
    if ids.ndim != 1:
        raise BundleError(f"{p}: ids must be 1-D, got shape {list(ids.shape)}")
    return _normalise_ids(ids, str(p))


def _normalise_ids(ids: np.ndarray, source: str) -> np.ndarray:
    if np.issubdtype(ids.dtype, np.integer):
        return ids.astype(np.int64)
    if ids.dtype.kind in "US":
        return ids.astype(str)
    raise BundleError(f"{source}: ids must be integers or strings, got {ids.dtype}")


def _item_ids(ids: str | Path | np.ndarray | None, store: FeatureStore, first_default: int | None) -> np.ndarray:
    """Ids given (array or file), else the feature file's own ids, else consecutive ints from first_default."""
    if isinstance(ids, np.ndarray):
        out = _normalise_ids(ids, "ids")
    elif ids is not None:
        out = load_ids(ids)
    elif store.ids is not None:
        out = _normalise_ids(store.ids, str(store.path))
    elif first_default is None:
        raise BundleError("this bundle has string ids: pass --ids for the new items")
    else:
        out = np.arange(first_default, first_default + store.n_rows, dtype=np.int64)
    if len(out) != store.n_rows:
        raise BundleError(f"{len(out)} ids for {store.n_rows} feature rows in {store.path}")
    return out


def _check_unique(ids: np.ndarray, source: str) -> None:
    dup = ItemIds.from_array(ids).duplicates()
    if dup:
        raise BundleError(f"{source}: duplicate item ids, e.g. {dup}")


# ---- writing ------------------------------------------------------------------------------------------
class PartWriter:
    """Writes one part (codes, block postings, optional dense index, ids) into ``directory``, chunk by chunk:
    memory stays bounded by one block of items plus the dense index being built."""

    def __init__(self, directory: Path, n: int, k: int, n_latents: int, dense_dim: int | None = None, factory: str = "Flat"):
        directory.mkdir(parents=True, exist_ok=False)
        self.dir, self.n, self.k, self.n_latents = directory, n, k, n_latents
        idx_dtype = np.int16 if n_latents <= np.iinfo(np.int16).max else np.int32
        self.codes_idx = np.lib.format.open_memmap(directory / "codes_idx.npy", mode="w+", dtype=idx_dtype, shape=(n, k))
        self.codes_val = np.lib.format.open_memmap(directory / "codes_val.npy", mode="w+", dtype=np.float16, shape=(n, k))
        self.postings = PostingsWriter(n_latents, directory)
        self.dense = DenseBuilder(dense_dim, factory) if dense_dim else None
        self.pos = 0
        self._done = 0  # rows already in posting blocks

    def add(self, idx: np.ndarray, val: np.ndarray, vectors: np.ndarray | None = None) -> None:
        """The next rows' codes ([m, k] latent ids, unit values) and, for a dense part, their vectors."""
        m = len(idx)
        if self.pos + m > self.n:
            raise BundleError(f"part {self.dir.name}: {self.pos + m} rows written, {self.n} announced")
        self.codes_idx[self.pos : self.pos + m] = idx
        self.codes_val[self.pos : self.pos + m] = val
        self.pos += m
        while self.pos - self._done >= BLOCK or (self.pos == self.n and self._done < self.n):
            b = min(self.n, self._done + BLOCK)
            self.postings.add_block(self.codes_idx[self._done : b], self.codes_val[self._done : b])
            self._done = b
        if self.dense is not None:
            if vectors is None:
                raise BundleError("a dense part needs the items' vectors")
            self.dense.add(vectors)

    def finish(self, ids: np.ndarray) -> str:
        """Flush everything to disk (fsynced); returns the id kind."""
        if self.pos != self.n:
            raise BundleError(f"part {self.dir.name}: {self.pos} rows written, {self.n} announced")
        if len(ids) != self.n:
            raise BundleError(f"part {self.dir.name}: {len(ids)} ids for {self.n} items")
        offsets, _, _ = self.postings.finish()
        atomic_save_npy(self.dir / "post_offsets.npy", offsets)
        for arr in (self.codes_idx, self.codes_val):
            arr.flush()
        for name in ("codes_idx.npy", "codes_val.npy"):
            with open(self.dir / name, "rb+") as f:
                os.fsync(f.fileno())
        del self.codes_idx, self.codes_val
        if self.dense is not None:
            write_dense_index(self.dense.finish(), self.dir / "dense.faiss")
        kind = write_ids(self.dir, ids, atomic_save_npy)
        fsync_dir(self.dir)
        return kind


@torch.no_grad()
def encode_chunks(
    model: SparcModel, stream: str, store: FeatureStore, start: int, stop: int, batch_size: int, dense: bool,
    progress: bool, code_kind: CodeKind = "search",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:  # fmt: skip
    """Codes of kind ``code_kind`` (idx, L2-normalised float16 values) and, if ``dense``, the centred unit
    feature vectors, by batch."""
    b_dec = model.codecs[stream].b_dec
    with tqdm(total=stop - start, desc=f"encoding {stream}", unit="item", disable=not progress, leave=False) as bar:
        for a in range(start, stop, batch_size):
            b = min(stop, a + batch_size)
            x = torch.from_numpy(np.ascontiguousarray(store.read_range(a, b))).to(model.device)
            if not torch.isfinite(x).all():
                bad = a + int((~torch.isfinite(x).all(1)).nonzero()[0])
                raise BundleError(f"{store.path}: row {bad} contains NaN or inf")
            code = model.encode({stream: x}, code=code_kind)
            vals = torch.nn.functional.normalize(code.values, dim=1)
            vectors = None
            if dense:
                centred = model.normalize(stream, x.float()) - b_dec
                vectors = torch.nn.functional.normalize(centred, dim=1).cpu().numpy()
            yield code.indices.cpu().numpy(), vals.cpu().numpy().astype(np.float16), vectors
            bar.update(b - a)


def write_part(
    directory: Path,
    n: int,
    k: int,
    n_latents: int,
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    ids: np.ndarray,
    dense_dim: int | None = None,
    factory: str = "Flat",
) -> str:
    """Write a part from chunks of (idx, val, vectors); returns the id kind."""
    w = PartWriter(directory, n, k, n_latents, dense_dim, factory)
    for idx, val, vec in chunks:
        w.add(idx, val, vec)
    return w.finish(ids)


def build_bundle(
    checkpoint: str | Path,
    stream: str,
    features: str | Path,
    out: str | Path,
    ids: str | Path | np.ndarray | None = None,
    dense: bool | None = None,
    faiss_factory: str = "Flat",
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 8192,
    progress: bool = True,
    model: SparcModel | None = None,
    seismic: SeismicSettings | None = None,
    code: CodeKind = "search",
) -> Path:
    """Encode one stream's gallery with a checkpoint and write a bundle (or shard ``i`` of ``n``) to ``out``;
    with ``seismic``, each part also gets a Seismic index (the seismic path). ``dense``: also a
    FAISS index for the dense path (default: when FAISS is installed)."""
    t0 = time.perf_counter()
    if dense is None:
        from .faiss_backend import faiss_installed

        dense = faiss_installed()
    clean_stale_builds(out)  # what killed builds left behind
    ckpt_hash = checkpoint_hash(checkpoint)
    if model is None:
        model = load_checkpoint(checkpoint, device=pick_device())
    elif getattr(model, "checkpoint_sha256", None) != ckpt_hash:
        raise BundleError(f"model= is not checkpoint {checkpoint} (give the model load_checkpoint returns for it, or none)")
    elif abs(model.soft_weight - model.checkpoint_soft_weight) > 1e-6:
        raise BundleError(
            f"model= encodes at soft weight {model.soft_weight:g}, its checkpoint {checkpoint} at "
            f"{model.checkpoint_soft_weight:g}: save the model as a checkpoint and build with that"
        )
    if stream not in model.streams:
        raise BundleError(f"stream {stream!r} is not in checkpoint {checkpoint} (it has {model.streams})")
    store = FeatureStore(features)
    if store.dim != model.cfg.streams[stream]:
        raise BundleError(
            f"{store.path}: dim {store.dim}, but stream {stream!r} of the checkpoint expects {model.cfg.streams[stream]}"
        )
    i, n_shards = shard
    if not 0 <= i < n_shards:
        raise BundleError(f"shard {i} of {n_shards} does not exist")
    per = -(-store.n_rows // n_shards)
    start, stop = min(i * per, store.n_rows), min((i + 1) * per, store.n_rows)
    if stop <= start:
        raise BundleError(f"{store.path}: shard {i}/{n_shards} holds no rows ({store.n_rows} rows in all)")
    all_ids = _item_ids(ids, store, first_default=0)
    _check_unique(all_ids, "ids")  # the whole source: shards of one build never share an id
    item_ids = all_ids[start:stop]
    del all_ids
    path = Path(out)
    tmp, vdir = new_version_dir(path)
    try:
        chunks = encode_chunks(model, stream, store, start, stop, batch_size, dense, progress, code)
        kind = write_part(tmp / "part-00000", stop - start, model.k, model.n_latents, chunks, item_ids,
                          store.dim if dense else None, faiss_factory)  # fmt: skip
        if seismic is not None:
            build_part_index(tmp / "part-00000", _part_codes(tmp / "part-00000"), seismic, model.n_latents)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "stream": stream,
            "n_latents": model.n_latents,
            "k": model.k,
            "dim": store.dim,
            "n_items": stop - start,
            "checkpoint_sha256": ckpt_hash,
            "checkpoint_path": relative_checkpoint(checkpoint, out),
            "id_kind": kind,
            "dense": dense,
            "faiss_factory": faiss_factory if dense else None,
            "shard": {"index": i, "count": n_shards, "row_start": start, "row_stop": stop},
            "created_at": now,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "source": str(Path(features).resolve()),
            "parts": [{"name": "part-00000", "n_items": stop - start, "created_at": now}],
            "ids_unique_in_source": True,
            "seismic": seismic.model_dump() if seismic is not None else None,
            "code": code,
            "soft_weight": model.soft_weight,
        }
        return commit_version(path, tmp, vdir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_bundle_from_codes(
    out: str | Path,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    n: int,
    k: int,
    n_latents: int,
    ids: np.ndarray | None = None,
    stream: str = "codes",
    checkpoint_sha256: str = NO_CHECKPOINT,
    progress: bool = True,
) -> Path:
    """A sparse-only bundle from codes computed elsewhere (chunks of [m, k] idx and unit values), in bounded
    memory. Its checkpoint fields are placeholders unless given: search it through ``Bundle``, or with a
    Searcher given the model whose codes these are."""
    t0 = time.perf_counter()
    path = Path(out)
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    tmp, vdir = new_version_dir(path)
    try:
        bar = tqdm(total=n, desc="writing codes", unit="item", disable=not progress, leave=False)

        def counted() -> Iterator[tuple[np.ndarray, np.ndarray, None]]:
            for idx, val in chunks:
                yield idx, val, None
                bar.update(len(idx))

        kind = write_part(tmp / "part-00000", n, k, n_latents, counted(), ids)
        bar.close()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "stream": stream, "n_latents": n_latents, "k": k, "dim": 0, "n_items": n,
            "checkpoint_sha256": checkpoint_sha256, "checkpoint_path": "", "id_kind": kind, "dense": False,
            "faiss_factory": None, "shard": {"index": 0, "count": 1, "row_start": 0, "row_stop": n},
            "created_at": now, "build_seconds": round(time.perf_counter() - t0, 3), "source": "codes",
            "parts": [{"name": "part-00000", "n_items": n, "created_at": now}], "ids_unique_in_source": False,
        }  # fmt: skip
        return commit_version(path, tmp, vdir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _part_codes(part_dir: Path, chunk: int = BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A written part's codes, in chunks (memory-mapped)."""
    idx = np.load(part_dir / "codes_idx.npy", mmap_mode="r")
    val = np.load(part_dir / "codes_val.npy", mmap_mode="r")
    for a in range(0, len(idx), chunk):
        yield np.asarray(idx[a : a + chunk]), np.asarray(val[a : a + chunk], dtype=np.float32)


def add_seismic_index(path: str | Path, settings: SeismicSettings | None = None) -> Path:
    """Give every part of a bundle a Seismic index (a new version; the parts' other files are linked)."""
    path = Path(path)
    old = Bundle(path)
    m = old.manifest
    if m.version == 1:
        raise BundleError(f"{path}: a format-1 bundle; rebuild it (or `sparc index add` to it) first")
    settings = settings or SeismicSettings()
    clean_stale_builds(path)
    tmp, vdir = new_version_dir(path)
    try:
        for info in m.parts:
            _link_tree(old.vdir / info.name, tmp / info.name, skip={INDEX_FILE})
            build_part_index(tmp / info.name, _part_codes(tmp / info.name), settings, m.n_latents)
        manifest = m.model_dump() | {
            "seismic": settings.model_dump(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        linked = {name: c for name, c in m.checksums.items() if not name.endswith("/" + INDEX_FILE)}
        return commit_version(path, tmp, vdir, manifest, known=linked)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


COMPACT_ABOVE = 0.2  # `index add` compacts a bundle whose deleted rows exceed this share of its rows


def append_to_bundle(
    path: str | Path,
    features: str | Path,
    ids: str | Path | np.ndarray | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 8192,
    progress: bool = True,
    replace: bool = False,
    compact_above: float = COMPACT_ABOVE,
) -> Path:
    """Add items to a bundle as a new part: the new version links the old parts' files (nothing rewritten).
    An id the bundle already holds is refused, unless ``replace``: then its old row is deleted in the same
    version (an upsert: no moment serves both or neither). When deleted rows then make up more than
    ``compact_above`` of the bundle, it is compacted too (a second new version)."""
    old = Bundle(path, mmap=True)
    m = old.manifest
    path = Path(path)
    clean_stale_builds(path)
    ckpt = Path(checkpoint) if checkpoint is not None else checkpoint_of(path, m)
    require_checkpoint(
        m.checkpoint_sha256, checkpoint_hash(ckpt), old.vdir / MANIFEST, remedy="append with the bundle's own checkpoint"
    )
    model = load_checkpoint(ckpt, device=pick_device())
    store = FeatureStore(features)
    if store.dim != m.dim:
        raise BundleError(f"{store.path}: dim {store.dim}, bundle holds dim {m.dim}")
    next_int = None
    if m.id_kind == "int":
        next_int = max((int(np.asarray(p.ids.keys).view(np.int64).max()) + 1 for p in old.parts if p.n_items), default=0)
    new_ids = _item_ids(ids, store, first_default=next_int)
    if (new_ids.dtype.kind == "i") != (m.id_kind == "int"):
        hint = (
            f"omit --ids to number the new items from {next_int}, or give integer ids"
            if m.id_kind == "int"
            else "give --ids with one string id per new row"
        )
        raise BundleError(f"new ids are {'int' if new_ids.dtype.kind == 'i' else 'str'}, the bundle's are {m.id_kind}: {hint}")
    _check_unique(new_ids, "new ids")
    clash = old.contains(new_ids.tolist() if len(new_ids) <= 1_000_000 else new_ids)
    if clash.any() and not replace:
        raise BundleError(
            f"ids (existing + new): duplicate item ids, e.g. {new_ids[clash][:5].tolist()} (--replace replaces them)"
        )
    if clash.any() and m.version == 1:
        raise BundleError(f"{path}: a format-1 bundle cannot replace items; add without them first")
    replaced = new_ids[clash].tolist() if clash.any() else []
    tmp, vdir = new_version_dir(path)
    try:
        parts = [p.model_dump() for p in m.parts]
        if m.version == 1:  # rewrite the old arrays once as a part of the current format
            write_part(tmp / "part-00000", m.n_items, m.k, m.n_latents,
                       ((i, v.astype(np.float16), None) for _, i, v in old.iter_codes()), np.asarray(old.all_ids()))  # fmt: skip
            if old.parts[0].dense_index is not None:
                write_dense_index(old.parts[0].dense_index, tmp / "part-00000" / "dense.faiss")
            parts = [{"name": "part-00000", "n_items": m.n_items, "created_at": m.created_at}]
        else:
            for i, (info, part) in enumerate(zip(m.parts, old.parts)):
                _link_tree(old.vdir / info.name, tmp / info.name, skip={"deleted.npy"} if replaced else frozenset())
                if replaced:  # the replaced items' old rows: deleted in this same version
                    rows = part.ids.find(replaced)
                    hit = rows >= 0
                    hit[hit] = part.live(rows[hit])
                    gone = np.union1d(part.deleted, rows[hit]).astype(np.int64)
                    if len(gone):
                        atomic_save_npy(tmp / info.name / "deleted.npy", gone)
                    parts[i] = parts[i] | {"n_deleted": len(gone)}
        name = f"part-{len(parts):05d}"
        chunks = encode_chunks(model, m.stream, store, 0, store.n_rows, batch_size, m.dense, progress, m.code)
        kind = write_part(tmp / name, store.n_rows, m.k, m.n_latents, chunks, new_ids,
                          m.dim if m.dense else None, m.faiss_factory or "Flat")  # fmt: skip
        if m.seismic is not None:
            build_part_index(tmp / name, _part_codes(tmp / name), m.seismic, m.n_latents)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        parts.append({"name": name, "n_items": store.n_rows, "created_at": now})
        manifest = m.model_dump() | {
            "version": VERSION,
            "n_items": m.n_items + store.n_rows,
            "id_kind": kind,
            "checkpoint_path": relative_checkpoint(ckpt, path),
            "created_at": now,
            "parts": parts,
        }
        known = {n: c for n, c in m.checksums.items() if not (replaced and n.endswith("/deleted.npy"))}
        out = commit_version(path, tmp, vdir, manifest, known=known if m.version > 1 else None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dead = sum(p.get("n_deleted", 0) for p in parts)
    if dead > compact_above * manifest["n_items"]:
        out = compact_bundle(path, progress=progress)
    return out


def delete_items(path: str | Path, ids: Any) -> tuple[Path, list[Any], int]:
    """Delete items by id: a new version whose parts carry tombstones (``deleted.npy``, sorted local rows;
    nothing else rewritten), switched atomically. No search path, lookup, explanation or export returns a
    deleted item from then on; ``compact_bundle`` drops the rows for good. Returns (the live version, the
    ids not found among the live items, how many were deleted)."""
    path = Path(path)
    old = Bundle(path)
    m = old.manifest
    if m.version == 1:
        raise BundleError(f"{path}: a format-1 bundle; `sparc index add` to it (or rebuild it) first")
    wanted = list(dict.fromkeys(ids.tolist() if isinstance(ids, np.ndarray) else list(ids)))
    if m.id_kind == "int":
        try:
            wanted = [int(x) for x in wanted]
        except (TypeError, ValueError):
            raise BundleError(f"{path}: ids are integers; got {wanted[:3]}") from None
    else:
        wanted = [str(x) for x in wanted]
    found = np.zeros(len(wanted), dtype=bool)
    per_part: list[np.ndarray] = []
    for part in old.parts:
        rows = part.ids.find(wanted)
        hit = rows >= 0
        hit[hit] = part.live(rows[hit])
        found |= hit
        per_part.append(np.union1d(part.deleted, rows[hit]).astype(np.int64))
    unknown = [w for w, f in zip(wanted, found) if not f]
    n_deleted = int(found.sum())
    if not n_deleted:
        return old.vdir, unknown, 0
    clean_stale_builds(path)
    tmp, vdir = new_version_dir(path)
    try:
        parts = []
        for info, rows in zip(m.parts, per_part):
            _link_tree(old.vdir / info.name, tmp / info.name, skip={"deleted.npy"})
            if len(rows):
                atomic_save_npy(tmp / info.name / "deleted.npy", rows)
            parts.append(info.model_dump() | {"n_deleted": len(rows)})
        manifest = m.model_dump() | {"parts": parts, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        known = {n: c for n, c in m.checksums.items() if not n.endswith("/deleted.npy")}
        return commit_version(path, tmp, vdir, manifest, known=known), unknown, n_deleted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def compact_bundle(path: str | Path, progress: bool = True) -> Path:
    """Rewrite the parts that hold deleted rows without them (a new version; parts without deletions are
    linked): the bundle then equals a fresh build of its live items. A dense part's vectors are taken back
    from its FAISS index (which must support reconstruction: Flat, or an index with a direct map)."""
    path = Path(path)
    old = Bundle(path)
    m = old.manifest
    if not any(len(p.deleted) for p in old.parts):
        return old.vdir
    clean_stale_builds(path)
    tmp, vdir = new_version_dir(path)
    try:
        parts, linked = [], {}
        for info, part in zip(m.parts, old.parts):
            if not len(part.deleted):
                _link_tree(old.vdir / info.name, tmp / info.name)
                parts.append(info.model_dump())
                linked |= {n: c for n, c in m.checksums.items() if n.startswith(info.name + "/")}
                continue
            keep = np.flatnonzero(part.alive)
            vectors = None
            if part.dense_index is not None:
                try:
                    vectors = part.dense_index.reconstruct_n(0, part.n_items)[keep]
                except RuntimeError as e:
                    raise BundleError(
                        f"{old.vdir / info.name / 'dense.faiss'}: its vectors cannot be taken back ({str(e).splitlines()[0]}); "
                        "rebuild the bundle from its features instead of compacting"
                    ) from None

            def chunks(part: Part = part, keep: np.ndarray = keep, vectors: np.ndarray | None = vectors) -> Iterator:
                for a in range(0, len(keep), BLOCK):
                    rows = keep[a : a + BLOCK]
                    vec = None if vectors is None else vectors[a : a + BLOCK]
                    yield np.asarray(part.codes_idx[rows]), np.asarray(part.codes_val[rows]), vec

            ids = np.asarray(part.ids.take(keep), dtype=np.int64 if m.id_kind == "int" else str)
            write_part(tmp / info.name, len(keep), m.k, m.n_latents, chunks(), ids, m.dim if m.dense else None,
                       m.faiss_factory or "Flat")  # fmt: skip
            if m.seismic is not None:
                build_part_index(tmp / info.name, _part_codes(tmp / info.name), m.seismic, m.n_latents)
            parts.append(info.model_dump() | {"n_items": len(keep), "n_deleted": 0})
        manifest = m.model_dump() | {
            "parts": parts,
            "n_items": sum(p["n_items"] for p in parts),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return commit_version(path, tmp, vdir, manifest, known=linked)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_tree(src: Path, dst: Path, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Hard-link a part's files into a new version (copy where the filesystem cannot link)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in skip:
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


add_approx_index = add_seismic_index  # the earlier name

__all__ = [
    "CURRENT", "FORMAT", "MANIFEST", "VERSION", "ApproxSettings", "Bundle", "BundleError", "ItemIds", "Manifest",
    "Part", "PartInfo", "SeismicSettings", "ShardInfo", "add_approx_index", "add_seismic_index", "append_to_bundle",
    "build_bundle", "build_bundle_from_codes", "checkpoint_of", "clean_stale_builds", "compact_bundle", "current_version",
    "delete_items",
    "read_manifest", "shards_share_ids",
]  # fmt: skip
