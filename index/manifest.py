"""The on-disk form of a bundle: its manifest, its versions and how a new one is switched in, and the one
check that a bundle (or a Milvus collection exported from one) belongs to a checkpoint.

A bundle is a directory whose ``CURRENT`` file names the live version sub-directory (``v-...``); a new
version is written completely into a temp folder, fsynced, renamed, and only then does ``CURRENT`` move to
it with an atomic rename; so a build killed at any point leaves the previous version untouched and
loadable (see index/bundle.py for what a version holds).
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparc_core.atomic import POINTER, VersionedDir, atomic_write_json

from .errors import BundleError
from .seismic_backend import SeismicSettings
from .validate import check_file_name, checksum

FORMAT = "sparc-index"
VERSION = 2
CURRENT = POINTER
BUILDING = ".building-"  # prefix of a version being written: .building-<pid>-<version>
MANIFEST = "manifest.json"
LEGACY_ARRAYS = ("ids", "codes_idx", "codes_val")  # format version 1: one set of arrays per version


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = 0  # this shard's number
    count: int = 1  # shards in the whole gallery
    row_start: int = 0  # first feature row of this shard (inclusive)
    row_stop: int = 0  # last feature row (exclusive)


class PartInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^part-[0-9]{5,}$")  # sub-directory of the version (never a path elsewhere)
    n_items: int = Field(ge=0)  # rows in the part, deleted ones included
    created_at: str
    n_deleted: int = Field(0, ge=0)  # rows deleted (tombstones in deleted.npy) until a compaction drops them


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
    checksums: dict[str, str] = {}  # file path in the version -> "crc32:..." of its bytes (absent in older bundles)
    source: str  # features file the items came from
    parts: list[PartInfo] = []  # format 2; empty in format-1 bundles
    ids_unique_in_source: bool = False  # ids were checked unique over the whole source (all shards)
    # Seismic indexes in every part (the seismic path); "approx" in manifests written before the rename
    seismic: SeismicSettings | None = Field(None, validation_alias=AliasChoices("seismic", "approx"))
    # Which of the model's codes the items hold (sparc_core.model.CodeKind; queries are encoded the same way),
    # and the checkpoint's search weight of unagreed latents when built (0: the agreed code alone).
    code: Literal["search", "agreed", "full"] = "search"
    soft_weight: float = 0.0

    @field_validator("files", "checksums")
    @classmethod
    def _plain_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            check_file_name(name)
        return v


def checkpoint_of(path: str | Path, manifest: Manifest) -> Path:
    """The checkpoint a bundle records: its path relative to the bundle directory (so a project can move),
    or an absolute one."""
    p = Path(manifest.checkpoint_path)
    return p if p.is_absolute() else (Path(path) / p)


def relative_checkpoint(checkpoint: str | Path, bundle: str | Path) -> str:
    return os.path.relpath(Path(checkpoint).resolve(), Path(bundle).resolve())


def bundle_versions(path: str | Path) -> VersionedDir:
    """A bundle's versions (``v-<time>-<hex>``): only the current one is kept."""
    return VersionedDir(path, prefix="v-", temp=BUILDING, keep=0)


def clean_stale_builds(path: str | Path) -> list[str]:
    """Remove the temp folders of builds whose process is gone (killed), and versions no CURRENT names;
    returns their names."""
    return bundle_versions(path).prune()


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
    if not bundle_versions(path).valid_name(name) or not vdir.is_dir():
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


def require_checkpoint(
    have: str, want: str, where: str | Path, made: str = "built with", remedy: str = "rebuild the index with this checkpoint"
) -> None:
    """The one identity check between a bundle (or collection) and a model: ``have`` is the checkpoint hash
    the index records, ``want`` the model's; they differ -> BundleError naming both and what to do."""
    if have != want:
        raise BundleError(
            f"{where}: {made} checkpoint {have[:12]}, the model is {want[:12]} (it is not the checkpoint the index "
            f"was built with); {remedy}"
        )


NO_CHECKPOINT = "none"  # build_bundle_from_codes: codes computed elsewhere, no model identity to compare


def require_model(manifest: Manifest, model: Any, where: str | Path, checkpoint_sha256: str | None = None) -> None:
    """The one check that a model may search an index: it is the checkpoint the index was built with
    (``checkpoint_sha256``, else the hash ``load_checkpoint`` recorded on the model) and it encodes queries
    as the items were encoded (the manifest's code, at its soft weight). BundleError naming both otherwise.
    Indexes of codes computed elsewhere (checkpoint ``none``) have nothing to compare."""
    if manifest.checkpoint_sha256 == NO_CHECKPOINT:
        return
    have = checkpoint_sha256 or getattr(model, "checkpoint_sha256", None)
    if have is None:
        raise BundleError(
            f"{where}: the model carries no checkpoint identity (it was not loaded with load_checkpoint); pass "
            "checkpoint_sha256 of the checkpoint it was saved as, or load the index's checkpoint"
        )
    require_checkpoint(manifest.checkpoint_sha256, have, where)
    served = float(model.soft_weight)
    if manifest.code == "search" and abs(served - manifest.soft_weight) > 1e-6:  # only the search code has the weight
        raise BundleError(
            f"{where}: items were encoded at soft weight {manifest.soft_weight:g}, the model encodes queries at "
            f"{served:g} (set_soft_weight after loading); rebuild the index or set_soft_weight({manifest.soft_weight:g})"
        )


def new_version_dir(path: Path) -> tuple[Path, Path]:
    """(temp dir to write into, final version dir)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    vdir = path / f"v-{stamp}-{secrets.token_hex(3)}"
    return bundle_versions(path).begin(vdir.name), vdir


def commit_version(
    path: Path, tmp: Path, vdir: Path, manifest: dict[str, Any], keep: int = 1, known: dict[str, str] | None = None
) -> Path:
    """Record file sizes and checksums, write the manifest, rename ``tmp`` to ``vdir`` and point CURRENT at
    it; prune. ``known``: checksums of files linked unchanged from the previous version (not read again)."""
    found = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
    files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in found}
    known = known or {}
    sums = {name: known.get(name) or checksum(tmp / name) for name in files}
    manifest = {k: v for k, v in manifest.items() if k not in ("files", "checksums")} | {"files": files, "checksums": sums}
    Manifest.model_validate(manifest)
    atomic_write_json(tmp / MANIFEST, manifest)
    versions = bundle_versions(path)
    versions.keep = keep - 1
    return versions.commit(tmp, vdir.name)
