"""Index bundles: build, append, load and verify the on-disk form of a gallery.

A bundle is a directory whose ``CURRENT`` file names the live version sub-directory::

    BUNDLE/CURRENT                 "v-20261125T101500-3f2a"
    BUNDLE/v-.../manifest.json     what was built, from which checkpoint, with which settings
    BUNDLE/v-.../ids.npy           item ids (int64 or unicode), row order
    BUNDLE/v-.../codes_idx.npy     [n, k] latent ids of every item's code (int16/int32)
    BUNDLE/v-.../codes_val.npy     [n, k] float16 code values, L2-normalised per row
    BUNDLE/v-.../post_*.npy        posting lists over latents (the sparse search structure)
    BUNDLE/v-.../dense.faiss       FAISS index over the cross-decoded space (optional)

A new version is written completely, fsynced, and only then does ``CURRENT`` move to it with an atomic
rename; so a build killed at any point leaves the previous bundle untouched and loadable.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from sparc_core import SparcError, SparcModel, checkpoint_hash, load_checkpoint
from sparc_core.checkpoint import atomic_write_bytes, atomic_write_json, pick_device
from sparc_core.data import FeatureStore

from .faiss_backend import build_dense_index, read_dense_index, write_dense_index
from .postings import Postings

FORMAT = "sparc-index"
VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
ARRAYS = ("ids", "codes_idx", "codes_val", "post_offsets", "post_items", "post_values")


class BundleError(SparcError, RuntimeError):
    """A bundle that cannot be built or loaded; the message names the file and the problem."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = 0  # this shard's number
    count: int = 1  # shards in the whole gallery
    row_start: int = 0  # first feature row of this shard (inclusive)
    row_stop: int = 0  # last feature row (exclusive)


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
    files: dict[str, int]  # file name -> size in bytes (truncation check)
    source: str  # features file the items came from


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
        return Manifest.model_validate(json.loads(mpath.read_text()))
    except FileNotFoundError:
        raise BundleError(f"{mpath}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: corrupt JSON ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        raise BundleError(f"{mpath}: invalid manifest ({'.'.join(map(str, err['loc']))}: {err['msg']})") from None


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
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][:5].tolist()
        raise BundleError(f"{source}: duplicate item ids, e.g. {dup}")


@torch.no_grad()
def encode_gallery(
    model: SparcModel,
    stream: str,
    store: FeatureStore,
    start: int,
    stop: int,
    batch_size: int = 8192,
    dense: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes (idx, L2-normalised float16 values) and, if ``dense``, the centred unit feature vectors."""
    n = stop - start
    idx_dtype = np.int16 if model.n_latents <= np.iinfo(np.int16).max else np.int32
    codes_idx = np.empty((n, model.k), dtype=idx_dtype)
    codes_val = np.empty((n, model.k), dtype=np.float16)
    vectors = np.empty((n, store.dim), dtype=np.float32) if dense else None
    b_dec = model.codecs[stream].b_dec
    with tqdm(total=n, desc=f"encoding {stream}", unit="item", disable=not progress, leave=False) as bar:
        for a in range(start, stop, batch_size):
            b = min(stop, a + batch_size)
            x = torch.from_numpy(store.read_range(a, b)).to(model.device)
            if not torch.isfinite(x).all():
                bad = a + int((~torch.isfinite(x).all(1)).nonzero()[0])
                raise BundleError(f"{store.path}: row {bad} contains NaN or inf")
            code = model.encode({stream: x})
            vals = torch.nn.functional.normalize(code.values, dim=1)
            codes_idx[a - start : b - start] = code.indices.cpu().numpy()
            codes_val[a - start : b - start] = vals.cpu().numpy()
            if vectors is not None:
                centred = model.normalize(stream, x.float()) - b_dec
                vectors[a - start : b - start] = torch.nn.functional.normalize(centred, dim=1).cpu().numpy()
            bar.update(b - a)
    return codes_idx, codes_val, vectors


def _write_version(
    path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray], dense_index: Any | None, keep: int = 1
) -> Path:
    """Write a complete new version, then atomically point CURRENT at it; prune older versions."""
    path.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    vdir = path / f"v-{stamp}-{secrets.token_hex(3)}"
    tmp = path / f".building-{os.getpid()}-{vdir.name}"
    tmp.mkdir()
    try:
        files = {}
        for name, arr in arrays.items():
            _save_npy(tmp / f"{name}.npy", arr)
            files[f"{name}.npy"] = (tmp / f"{name}.npy").stat().st_size
        if dense_index is not None:
            write_dense_index(dense_index, tmp / "dense.faiss")
            files["dense.faiss"] = (tmp / "dense.faiss").stat().st_size
        manifest = manifest | {"files": files}
        Manifest.model_validate(manifest)
        atomic_write_json(tmp / MANIFEST, manifest)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, vdir)
        atomic_write_bytes(path / CURRENT, (vdir.name + "\n").encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _versions(path):
        if old != vdir and old not in _versions(path)[-keep:]:
            shutil.rmtree(old, ignore_errors=True)
    clean_stale_builds(path)
    return vdir


def build_bundle(
    checkpoint: str | Path,
    stream: str,
    features: str | Path,
    out: str | Path,
    ids: str | Path | np.ndarray | None = None,
    dense: bool = True,
    faiss_factory: str = "Flat",
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 8192,
    progress: bool = True,
    model: SparcModel | None = None,
) -> Path:
    """Encode one stream's gallery with a checkpoint and write a bundle (or shard ``i`` of ``n``) to ``out``."""
    t0 = time.perf_counter()
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
    item_ids = all_ids[start:stop]
    _check_unique(item_ids, "ids")
    codes_idx, codes_val, vectors = encode_gallery(model, stream, store, start, stop, batch_size, dense, progress)
    post = Postings.from_codes(codes_idx, codes_val.astype(np.float32), model.n_latents)
    dense_index = build_dense_index(vectors, faiss_factory) if vectors is not None else None
    manifest = {
        "stream": stream,
        "n_latents": model.n_latents,
        "k": model.k,
        "dim": store.dim,
        "n_items": stop - start,
        "checkpoint_sha256": ckpt_hash,
        "checkpoint_path": _relative_checkpoint(checkpoint, out),
        "id_kind": "int" if item_ids.dtype.kind == "i" else "str",
        "dense": dense,
        "faiss_factory": faiss_factory if dense else None,
        "shard": {"index": i, "count": n_shards, "row_start": start, "row_stop": stop},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "source": str(Path(features).resolve()),
    }
    arrays = {
        "ids": item_ids,
        "codes_idx": codes_idx,
        "codes_val": codes_val,
        "post_offsets": post.offsets,
        "post_items": post.items,
        "post_values": post.values,
    }
    return _write_version(Path(out), manifest, arrays, dense_index)


class Bundle:
    """A loaded bundle (one shard): ids, codes, postings and the optional FAISS index."""

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
        arr: dict[str, np.ndarray] = {}
        for name in ARRAYS:
            f = self.vdir / f"{name}.npy"
            try:
                arr[name] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise BundleError(f"{f}: unreadable ({e})") from None
        n = m.n_items
        if len(arr["ids"]) != n or arr["codes_idx"].shape != (n, m.k) or arr["codes_val"].shape != (n, m.k):
            raise BundleError(f"{self.vdir}: array shapes do not match the manifest's {n} items x k={m.k}")
        if len(arr["post_offsets"]) != m.n_latents + 1 or int(arr["post_offsets"][-1]) != len(arr["post_items"]):
            raise BundleError(f"{self.vdir / 'post_offsets.npy'}: inconsistent posting lists")
        self.ids = np.asarray(arr["ids"])
        self.codes_idx, self.codes_val = arr["codes_idx"], arr["codes_val"]
        self.postings = Postings(arr["post_offsets"], arr["post_items"], arr["post_values"], n)
        self.dense_index = read_dense_index(self.vdir / "dense.faiss") if m.dense else None
        if self.dense_index is not None and self.dense_index.ntotal != n:
            raise BundleError(f"{self.vdir / 'dense.faiss'}: holds {self.dense_index.ntotal} vectors, manifest says {n}")
        self._row_of: dict[Any, int] | None = None

    def row_of(self, item_id: Any) -> int:
        """Row number of an item id (KeyError if absent)."""
        if self._row_of is None:
            self._row_of = {v: i for i, v in enumerate(self.ids.tolist())}
        key = int(item_id) if self.manifest.id_kind == "int" else str(item_id)
        return self._row_of[key]

    def memory_bytes(self) -> dict[str, int]:
        """Resident bytes of the sparse path (postings + ids) and of the dense index."""
        dense = self.manifest.files.get("dense.faiss", 0)
        return {"sparse": self.postings.nbytes() + self.ids.nbytes, "dense": dense + self.ids.nbytes}


def append_to_bundle(
    path: str | Path,
    features: str | Path,
    ids: str | Path | np.ndarray | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 8192,
    progress: bool = True,
) -> Path:
    """Add items to a bundle: writes a new version holding the old items followed by the new ones."""
    old = Bundle(path, mmap=False)
    m = old.manifest
    clean_stale_builds(path)
    ckpt = Path(checkpoint) if checkpoint is not None else checkpoint_of(path, m)
    if checkpoint_hash(ckpt) != m.checkpoint_sha256:
        raise BundleError(f"{ckpt}: is not the checkpoint this bundle was built with ({m.checkpoint_sha256[:12]})")
    model = load_checkpoint(ckpt, device=pick_device())
    store = FeatureStore(features)
    if store.dim != m.dim:
        raise BundleError(f"{store.path}: dim {store.dim}, bundle holds dim {m.dim}")
    next_int = (int(old.ids.max()) + 1 if len(old.ids) else 0) if m.id_kind == "int" else None
    new_ids = _item_ids(ids, store, first_default=next_int)
    if (new_ids.dtype.kind == "i") != (m.id_kind == "int"):
        hint = (
            f"omit --ids to number the new items from {next_int}, or give integer ids"
            if m.id_kind == "int"
            else "give --ids with one string id per new row"
        )
        raise BundleError(f"new ids are {'int' if new_ids.dtype.kind == 'i' else 'str'}, the bundle's are {m.id_kind}: {hint}")
    all_ids = np.concatenate([old.ids, new_ids])
    _check_unique(all_ids, "ids (existing + new)")
    codes_idx, codes_val, vectors = encode_gallery(model, m.stream, store, 0, store.n_rows, batch_size, m.dense, progress)
    codes_idx = np.concatenate([old.codes_idx, codes_idx.astype(old.codes_idx.dtype)])
    codes_val = np.concatenate([old.codes_val, codes_val])
    post = Postings.from_codes(codes_idx, codes_val.astype(np.float32), m.n_latents)
    dense_index = old.dense_index
    if dense_index is not None and vectors is not None:
        dense_index.add(vectors)
    manifest = m.model_dump() | {
        "n_items": len(all_ids),
        "checkpoint_path": _relative_checkpoint(ckpt, path),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.pop("files")
    arrays = {
        "ids": all_ids,
        "codes_idx": codes_idx,
        "codes_val": codes_val,
        "post_offsets": post.offsets,
        "post_items": post.items,
        "post_values": post.values,
    }
    return _write_version(Path(path), manifest, arrays, dense_index)
