"""Index bundles: build, append, load and verify the on-disk form of a gallery.

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

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from sparc_core import SparcError, SparcModel, checkpoint_hash, load_checkpoint
from sparc_core.checkpoint import atomic_write_bytes, atomic_write_json, fsync_dir, pick_device
from sparc_core.data import FeatureStore

from .faiss_backend import DenseBuilder, read_dense_index, write_dense_index
from .ids import ItemIds, read_ids, write_ids
from .postings import (
    BLOCK,
    DEFAULT_BUDGET,
    DEFAULT_CANDIDATES,
    Postings,
    PostingsWriter,
    _pool,
    load_postings,
    merge_topk,
    search_threads,
)
from .seismic_backend import INDEX_FILE, ApproxSettings, build_part_index, load_part_index, search_one

FORMAT = "sparc-index"
VERSION = 2
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
LEGACY_ARRAYS = ("ids", "codes_idx", "codes_val")  # format version 1: one set of arrays per version


class BundleError(SparcError, RuntimeError):
    """A bundle that cannot be built or loaded; the message names the file and the problem."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = 0  # this shard's number
    count: int = 1  # shards in the whole gallery
    row_start: int = 0  # first feature row of this shard (inclusive)
    row_stop: int = 0  # last feature row (exclusive)


class PartInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^part-[0-9]{5,}$")  # sub-directory of the version (never a path elsewhere)
    n_items: int = Field(ge=0)
    created_at: str


class Manifest(BaseModel):
    """What a bundle holds and how it was built; verified on load."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["sparc-index"] = FORMAT
    version: int = VERSION
    stream: str
    n_latents: int
    k: int
    dim: int
    n_items: int
    checkpoint_sha256: str
    checkpoint_path: str  # relative to the bundle directory (absolute in bundles built before that)
    id_kind: Literal["int", "str"]
    dense: bool
    faiss_factory: str | None
    shard: ShardInfo
    created_at: str
    build_seconds: float
    files: dict[str, int]  # file path in the version -> size in bytes (truncation check)
    source: str  # features file the items came from
    parts: list[PartInfo] = []  # format 2; empty in format-1 bundles
    ids_unique_in_source: bool = False  # ids were checked unique over the whole source (all shards)
    approx: ApproxSettings | None = None  # Seismic indexes in every part (approximate sparse path)
    # Which of the model's codes the items hold (sparc_core.model.CodeKind; queries are encoded the same way),
    # and the checkpoint's search weight of unagreed latents when built (0: the agreed code alone).
    code: Literal["search", "agreed", "full"] = "search"
    soft_weight: float = 0.0


def checkpoint_of(path: str | Path, manifest: Manifest) -> Path:
    """The checkpoint a bundle records: its path relative to the bundle directory (so a project can move),
    or an absolute one."""
    p = Path(manifest.checkpoint_path)
    return p if p.is_absolute() else (Path(path) / p)


def _relative_checkpoint(checkpoint: str | Path, bundle: str | Path) -> str:
    return os.path.relpath(Path(checkpoint).resolve(), Path(bundle).resolve())


def clean_stale_builds(path: str | Path) -> list[str]:
    """Remove the temp folders of builds whose process is gone (killed); returns their names."""
    removed = []
    for stale in Path(path).glob(".building-*"):
        pid = stale.name.split("-")[1]
        alive = False
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True  # another user's live process
        if not alive:
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale.name)
    return removed


def _versions(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("v-*") if p.is_dir())


def current_version(path: str | Path) -> Path:
    """The live version directory of a bundle."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: index bundle not found")
    cur = path / CURRENT
    if not cur.is_file():
        raise BundleError(f"{cur}: missing (not a sparc index bundle, or its first build never finished)")
    name = cur.read_text().strip()
    vdir = path / name
    if not name.startswith("v-") or "/" in name or not vdir.is_dir():
        raise BundleError(f"{cur}: names version {name!r}, which does not exist")
    return vdir


def read_manifest(path: str | Path) -> Manifest:
    """The checked manifest of a bundle's live version."""
    vdir = current_version(path)
    mpath = vdir / MANIFEST
    try:
        m = Manifest.model_validate(json.loads(mpath.read_text()))
    except FileNotFoundError:
        raise BundleError(f"{mpath}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: corrupt JSON ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise BundleError(f"{mpath}: invalid manifest ({'.'.join(map(str, err['loc']))}: {err['msg']})") from None
    if m.version > VERSION:
        raise BundleError(f"{mpath}: bundle format {m.version} is newer than this sparc reads ({VERSION}); upgrade sparc")
    return m


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


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
        _save_npy(self.dir / "post_offsets.npy", offsets)
        for arr in (self.codes_idx, self.codes_val):
            arr.flush()
        for name in ("codes_idx.npy", "codes_val.npy"):
            with open(self.dir / name, "rb+") as f:
                os.fsync(f.fileno())
        del self.codes_idx, self.codes_val
        if self.dense is not None:
            write_dense_index(self.dense.finish(), self.dir / "dense.faiss")
        kind = write_ids(self.dir, ids, _save_npy)
        fsync_dir(self.dir)
        return kind


def _new_version_dir(path: Path) -> tuple[Path, Path]:
    """(temp dir to write into, final version dir)."""
    path.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    vdir = path / f"v-{stamp}-{secrets.token_hex(3)}"
    tmp = path / f".building-{os.getpid()}-{vdir.name}"
    tmp.mkdir()
    return tmp, vdir


def _commit_version(path: Path, tmp: Path, vdir: Path, manifest: dict[str, Any], keep: int = 1) -> Path:
    """Record file sizes, write the manifest, rename ``tmp`` to ``vdir`` and point CURRENT at it; prune."""
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    manifest = manifest | {"files": files}
    Manifest.model_validate(manifest)
    atomic_write_json(tmp / MANIFEST, manifest)
    fsync_dir(tmp)
    os.rename(tmp, vdir)
    fsync_dir(path)
    atomic_write_bytes(path / CURRENT, (vdir.name + "\n").encode())
    for old in _versions(path):
        if old != vdir and old not in _versions(path)[-keep:]:
            shutil.rmtree(old, ignore_errors=True)
    clean_stale_builds(path)
    return vdir


@torch.no_grad()
def encode_chunks(
    model: SparcModel, stream: str, store: FeatureStore, start: int, stop: int, batch_size: int, dense: bool, progress: bool
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Codes (idx, L2-normalised float16 values) and, if ``dense``, the centred unit feature vectors, by batch."""
    b_dec = model.codecs[stream].b_dec
    with tqdm(total=stop - start, desc=f"encoding {stream}", unit="item", disable=not progress, leave=False) as bar:
        for a in range(start, stop, batch_size):
            b = min(stop, a + batch_size)
            x = torch.from_numpy(np.ascontiguousarray(store.read_range(a, b))).to(model.device)
            if not torch.isfinite(x).all():
                bad = a + int((~torch.isfinite(x).all(1)).nonzero()[0])
                raise BundleError(f"{store.path}: row {bad} contains NaN or inf")
            code = model.encode({stream: x})
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
    approx: ApproxSettings | None = None,
) -> Path:
    """Encode one stream's gallery with a checkpoint and write a bundle (or shard ``i`` of ``n``) to ``out``;
    with ``approx``, each part also gets a Seismic index (the approximate sparse path). ``dense``: also a
    FAISS index for the dense path (default: when FAISS is installed)."""
    t0 = time.perf_counter()
    if dense is None:
        from .faiss_backend import faiss_installed

        dense = faiss_installed()
    clean_stale_builds(out)  # what killed builds left behind
    ckpt_hash = checkpoint_hash(checkpoint)
    if model is None:
        model = load_checkpoint(checkpoint, device=pick_device())
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
    tmp, vdir = _new_version_dir(path)
    try:
        chunks = encode_chunks(model, stream, store, start, stop, batch_size, dense, progress)
        kind = write_part(tmp / "part-00000", stop - start, model.k, model.n_latents, chunks, item_ids,
                          store.dim if dense else None, faiss_factory)  # fmt: skip
        if approx is not None:
            build_part_index(tmp / "part-00000", _part_codes(tmp / "part-00000"), approx, model.n_latents)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {
            "stream": stream,
            "n_latents": model.n_latents,
            "k": model.k,
            "dim": store.dim,
            "n_items": stop - start,
            "checkpoint_sha256": ckpt_hash,
            "checkpoint_path": _relative_checkpoint(checkpoint, out),
            "id_kind": kind,
            "dense": dense,
            "faiss_factory": faiss_factory if dense else None,
            "shard": {"index": i, "count": n_shards, "row_start": start, "row_stop": stop},
            "created_at": now,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "source": str(Path(features).resolve()),
            "parts": [{"name": "part-00000", "n_items": stop - start, "created_at": now}],
            "ids_unique_in_source": True,
            "approx": approx.model_dump() if approx is not None else None,
            "code": "search",
            "soft_weight": model.soft_weight,
        }
        return _commit_version(path, tmp, vdir, manifest)
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
    checkpoint_sha256: str = "none",
    progress: bool = True,
) -> Path:
    """A sparse-only bundle from codes computed elsewhere (chunks of [m, k] idx and unit values), in bounded
    memory. Its checkpoint fields are placeholders unless given: search it through ``Bundle``, or with a
    Searcher given the model whose codes these are."""
    t0 = time.perf_counter()
    path = Path(out)
    ids = np.arange(n, dtype=np.int64) if ids is None else ids
    tmp, vdir = _new_version_dir(path)
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
        return _commit_version(path, tmp, vdir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _part_codes(part_dir: Path, chunk: int = BLOCK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A written part's codes, in chunks (memory-mapped)."""
    idx = np.load(part_dir / "codes_idx.npy", mmap_mode="r")
    val = np.load(part_dir / "codes_val.npy", mmap_mode="r")
    for a in range(0, len(idx), chunk):
        yield np.asarray(idx[a : a + chunk]), np.asarray(val[a : a + chunk], dtype=np.float32)


def add_approx_index(path: str | Path, settings: ApproxSettings | None = None) -> Path:
    """Give every part of a bundle a Seismic index (a new version; the parts' other files are linked)."""
    path = Path(path)
    old = Bundle(path)
    m = old.manifest
    if m.version == 1:
        raise BundleError(f"{path}: a format-1 bundle; rebuild it (or `sparc index add` to it) first")
    settings = settings or ApproxSettings()
    clean_stale_builds(path)
    tmp, vdir = _new_version_dir(path)
    try:
        for info in m.parts:
            _link_tree(old.vdir / info.name, tmp / info.name, skip={INDEX_FILE})
            build_part_index(tmp / info.name, _part_codes(tmp / info.name), settings, m.n_latents)
        manifest = m.model_dump() | {
            "approx": settings.model_dump(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest.pop("files")
        return _commit_version(path, tmp, vdir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading ------------------------------------------------------------------------------------------
class Part:
    """One part of a loaded bundle: its ids, codes, postings and optional FAISS index; rows from ``row0``."""

    def __init__(self, name: str, row0: int, ids: ItemIds, codes_idx: np.ndarray, codes_val: np.ndarray,
                 postings: Postings, dense_index: Any | None, approx_index: Any | None = None) -> None:  # fmt: skip
        self.name, self.row0, self.ids = name, row0, ids
        self.codes_idx, self.codes_val, self.postings, self.dense_index = codes_idx, codes_val, postings, dense_index
        self.approx_index = approx_index

    @property
    def n_items(self) -> int:
        return len(self.ids)


class Bundle:
    """A loaded bundle (one shard): its parts, searched and addressed as one list of rows."""

    def __init__(self, path: str | Path, expected_checkpoint: str | None = None, mmap: bool = True) -> None:
        self.path = Path(path)
        self.vdir = current_version(self.path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        if expected_checkpoint is not None and m.checkpoint_sha256 != expected_checkpoint:
            raise BundleError(
                f"{self.vdir / MANIFEST}: built with checkpoint {m.checkpoint_sha256[:12]}, "
                f"but the service uses {expected_checkpoint[:12]}; rebuild the index with this checkpoint"
            )
        for name, size in m.files.items():
            f = self.vdir / name
            if not f.is_file():
                raise BundleError(f"{f}: missing")
            if f.stat().st_size != size:
                raise BundleError(f"{f}: {f.stat().st_size} bytes, manifest says {size} (truncated or corrupt)")
        self.parts = self._load_legacy(mmap) if m.version == 1 else self._load_parts(mmap)
        if sum(p.n_items for p in self.parts) != m.n_items:
            raise BundleError(f"{self.vdir}: parts hold {sum(p.n_items for p in self.parts)} items, manifest says {m.n_items}")
        self._row0 = np.array([p.row0 for p in self.parts], dtype=np.int64)

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
            dense = read_dense_index(d / "dense.faiss") if m.dense else None
            if dense is not None and dense.ntotal != n:
                raise BundleError(f"{d / 'dense.faiss'}: holds {dense.ntotal} vectors, manifest says {n}")
            approx = load_part_index(d) if m.approx is not None else None
            parts.append(Part(info.name, row0, ids, codes_idx, codes_val, postings, dense, approx))
            row0 += n
        return parts

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
        postings = Postings.from_codes(np.asarray(arr["codes_idx"]), np.asarray(arr["codes_val"]), m.n_latents)
        dense = read_dense_index(self.vdir / "dense.faiss") if m.dense else None
        if dense is not None and dense.ntotal != n:
            raise BundleError(f"{self.vdir / 'dense.faiss'}: holds {dense.ntotal} vectors, manifest says {n}")
        ids = ItemIds.from_array(np.asarray(arr["ids"]))
        return [Part(".", 0, ids, arr["codes_idx"], arr["codes_val"], postings, dense)]

    # ---- rows and ids -----------------------------------------------------------------------------
    def _split(self, rows: np.ndarray) -> Iterator[tuple[Part, np.ndarray, np.ndarray]]:
        """(part, positions in ``rows``, local rows) for each part that holds some of ``rows``."""
        which = np.searchsorted(self._row0, rows, side="right") - 1
        for pi in np.unique(which):
            sel = np.flatnonzero(which == pi)
            part = self.parts[int(pi)]
            yield part, sel, rows[sel] - part.row0

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
        """Row number of an item id (KeyError if absent)."""
        for part in self.parts:
            r = int(part.ids.find([item_id])[0])
            if r >= 0:
                return part.row0 + r
        raise KeyError(item_id)

    def contains(self, ids: Any) -> np.ndarray:
        """Whether each id is in the bundle (vectorised over parts)."""
        ids = list(ids)
        found = np.zeros(len(ids), dtype=bool)
        for part in self.parts:
            found |= part.ids.find(ids) >= 0
        return found

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
        """(rows, idx, val) of every item, part by part, in chunks."""
        for part in self.parts:
            for a in range(0, part.n_items, chunk):
                b = min(part.n_items, a + chunk)
                rows = np.arange(part.row0 + a, part.row0 + b)
                yield rows, np.asarray(part.codes_idx[a:b]), np.asarray(part.codes_val[a:b], dtype=np.float32)

    def all_ids(self) -> list[Any]:
        return [v for p in self.parts for v in p.ids.tolist()]

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
        out = []
        for part in self.parts:
            D, I = part.postings.search(q_idx, q_val, min(k, part.n_items), require=require, exclude=exclude,
                                        should_stop=should_stop)  # fmt: skip
            out.append((D, np.where(I >= 0, I + part.row0, -1)))
        return merge_topk(out, k)

    def search_approx(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        budget: float | None = None,
        candidates: int | None = None,
        require: list[int] | None = None,
        exclude: list[int] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k over all parts (index/postings.py: about ``budget`` of each query's postings,
        highest impact first; the best ``candidates`` rows rescored exactly): (D, I) as ``search_sparse``,
        every score exact."""
        budget = DEFAULT_BUDGET if budget is None else float(budget)
        candidates = DEFAULT_CANDIDATES if candidates is None else int(candidates)
        out = []
        for part in self.parts:
            D, I = part.postings.search(q_idx, q_val, min(k, part.n_items), require=require, exclude=exclude,
                                        should_stop=should_stop,
                                        approx=(budget, candidates, part.codes_idx, part.codes_val))  # fmt: skip
            out.append((D, np.where(I >= 0, I + part.row0, -1)))
        return merge_topk(out, k)

    def search_seismic(
        self,
        q_idx: np.ndarray,
        q_val: np.ndarray,
        k: int,
        query_cut: int | None = None,
        heap_factor: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k (Seismic candidates, exact scores) over all parts: (D, I) as ``search_sparse``."""
        a = self.manifest.approx
        if a is None:
            raise BundleError(f"{self.path}: has no Seismic index; add one with `sparc index seismic --bundle {self.path}`")
        cut = a.query_cut if query_cut is None else int(query_cut)
        hf = a.heap_factor if heap_factor is None else float(heap_factor)
        if not 0 < hf <= 1:
            raise ValueError(f"heap_factor must be in (0, 1], got {hf}")
        nq = len(q_idx)
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)

        def one(q: int) -> bool:
            if should_stop is not None and should_stop():
                return False
            on = q_val[q] > 0
            found = []
            for part in self.parts:
                d, r = search_one(part.approx_index, part.codes_idx, part.codes_val, np.asarray(q_idx[q])[on],
                                  np.asarray(q_val[q])[on], min(k, part.n_items), cut, hf)  # fmt: skip
                found.append((d[None, :], (r + part.row0)[None, :]))
            d, r = merge_topk(found, k)
            D[q], I[q] = d[0], r[0]
            return True

        done = list(_pool().map(one, range(nq))) if nq > 1 and search_threads() > 1 else [one(q) for q in range(nq)]
        if not all(done):
            from .postings import SearchStopped

            raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
        return D, I

    def posting(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and values of one latent over all parts."""
        rows, vals = zip(*[(r + p.row0, v) for p in self.parts for r, v in [p.postings.posting(latent)]])
        return np.concatenate(rows), np.concatenate(vals)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the sparse path (postings + ids + codes) and of the dense index, as stored."""
        sparse = dense = 0
        for name, size in self.manifest.files.items():
            if name.endswith("dense.faiss"):
                dense += size
            elif name != MANIFEST:
                sparse += size
        return {"sparse": sparse, "dense": dense}


def append_to_bundle(
    path: str | Path,
    features: str | Path,
    ids: str | Path | np.ndarray | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 8192,
    progress: bool = True,
) -> Path:
    """Add items to a bundle as a new part: the new version links the old parts' files (nothing rewritten)."""
    old = Bundle(path, mmap=True)
    m = old.manifest
    path = Path(path)
    clean_stale_builds(path)
    ckpt = Path(checkpoint) if checkpoint is not None else checkpoint_of(path, m)
    if checkpoint_hash(ckpt) != m.checkpoint_sha256:
        raise BundleError(f"{ckpt}: is not the checkpoint this bundle was built with ({m.checkpoint_sha256[:12]})")
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
    if clash.any():
        raise BundleError(f"ids (existing + new): duplicate item ids, e.g. {new_ids[clash][:5].tolist()}")
    tmp, vdir = _new_version_dir(path)
    try:
        parts = [p.model_dump() for p in m.parts]
        if m.version == 1:  # rewrite the old arrays once as a part of the current format
            write_part(tmp / "part-00000", m.n_items, m.k, m.n_latents,
                       ((i, v.astype(np.float16), None) for _, i, v in old.iter_codes()), np.asarray(old.all_ids()))  # fmt: skip
            if old.parts[0].dense_index is not None:
                write_dense_index(old.parts[0].dense_index, tmp / "part-00000" / "dense.faiss")
            parts = [{"name": "part-00000", "n_items": m.n_items, "created_at": m.created_at}]
        else:
            for info in m.parts:
                _link_tree(old.vdir / info.name, tmp / info.name)
        name = f"part-{len(parts):05d}"
        chunks = encode_chunks(model, m.stream, store, 0, store.n_rows, batch_size, m.dense, progress)
        kind = write_part(tmp / name, store.n_rows, m.k, m.n_latents, chunks, new_ids,
                          m.dim if m.dense else None, m.faiss_factory or "Flat")  # fmt: skip
        if m.approx is not None:
            build_part_index(tmp / name, _part_codes(tmp / name), m.approx, m.n_latents)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        parts.append({"name": name, "n_items": store.n_rows, "created_at": now})
        manifest = m.model_dump() | {
            "version": VERSION,
            "n_items": m.n_items + store.n_rows,
            "id_kind": kind,
            "checkpoint_path": _relative_checkpoint(ckpt, path),
            "created_at": now,
            "parts": parts,
        }
        manifest.pop("files")
        return _commit_version(path, tmp, vdir, manifest)
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


__all__ = [
    "ApproxSettings",
    "Bundle",
    "BundleError",
    "Manifest",
    "add_approx_index",
    "append_to_bundle",
    "build_bundle",
    "build_bundle_from_codes",
]
