"""All checkpoint I/O: safetensors + JSON, each version written completely, then switched to atomically.

A checkpoint directory holds versions and a pointer to the current one:
  CURRENT              the name of the current version directory (replaced atomically, last)
  v00001200-1a2b3c/    one complete save:
      config.json          model config, training config, step, and the sha256 of model.safetensors
      model.safetensors    weights and normalisation buffers (no pickle anywhere)
      metrics.json         the last training/validation metrics
      train_state.safetensors  optimizer moments and dead-latent counters, for exact resume (optional)
  metrics.json, metrics.jsonl, training_curves.png   the run's logs (not needed to load)
A save writes the new version into a hidden temp directory, fsyncs it, renames it into place and only then
replaces CURRENT, so a kill at any moment leaves the previous version loadable; the version before the
current one is kept, older ones and the leftovers of killed saves are removed by the next save. A directory
holding config.json + model.safetensors directly (a single version, e.g. copied by hand) loads as well.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import (  # noqa: F401 - the atomic writes were first imported from here
    POINTER,
    UMASK,
    VersionedDir,
    atomic_path,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    fsync_dir,
    replace_dir,
)
from .config import SparcConfig, SparcError
from .model import SparcModel

FORMAT = "sparc-checkpoint"
VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
TRAIN_STATE = "train_state.safetensors"
PARTIAL = ".partial-"  # prefix of a version being written (removed if a save was killed)


class CheckpointError(SparcError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (for "auto"), else CPU; or exactly the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` as a safetensors file."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~UMASK)  # save_file recreates the file with 0600


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)
    os.chmod(path, 0o666 & ~UMASK)  # readable by whoever may read the directory (a container user)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory (versioned, or a single version)."""
    d = Path(path)
    return (d / POINTER).is_file() or (d / CONFIG).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory holding the current version's files: ``path/<CURRENT>``, or ``path`` itself if it holds
    config.json directly."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    pointer = d / POINTER
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _versions_of(d).valid_name(name):
            raise CheckpointError(f"{pointer}: does not name a version directory ({name!r})")
        version = d / name
        if not (version / CONFIG).is_file():
            raise CheckpointError(f"{pointer}: names {name!r}, which has no {CONFIG}")
        return version
    if (d / CONFIG).is_file():
        return d
    raise CheckpointError(f"{d}: not a sparc checkpoint directory (no {POINTER} and no {CONFIG})")


def _versions_of(path: str | Path) -> VersionedDir:
    """A checkpoint directory's versions: current + the one saved before it kept (``keep=1``)."""
    return VersionedDir(path, prefix="v", temp=PARTIAL, keep=1, marker=CONFIG)


def clean_checkpoint_dir(path: str | Path) -> list[str]:
    """Remove what killed saves left (partial versions, temp files) and every version but the current one and
    the one before it; returns the names removed. Called by every save; safe to call any time no save runs."""
    d = Path(path)
    removed = _versions_of(d).prune()
    for p in d.glob(".*.tmp") if d.is_dir() else []:  # atomic_path's temp files of killed writes
        p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def save_checkpoint(
    model: SparcModel,
    path: str | Path,
    *,
    step: int = 0,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally metrics and resumable train state) as a new version of the checkpoint
    directory ``path`` and make it current atomically; returns ``path``."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    if (d / CONFIG).is_file() and not (d / POINTER).is_file():
        raise CheckpointError(f"{d}: holds a single-version checkpoint; save into a new directory")
    clean_checkpoint_dir(d)
    versions = _versions_of(d)
    name = f"v{step:08d}-{time.time_ns():x}"  # sorts by step, then by save time
    tmp = versions.begin(name)
    try:
        weights = tmp / WEIGHTS
        _write_tensors(weights, dict(model.state_dict()), {"format": FORMAT, "version": str(VERSION)})
        if train_state is not None:
            _write_tensors(tmp / TRAIN_STATE, train_state["tensors"], {"meta": json.dumps(train_state["meta"])})
        if metrics is not None:
            _write_json(tmp / METRICS, metrics)
        config = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "model": model.cfg.model_dump(),
            "train": train_config,
            "weights_sha256": file_sha256(weights),
        }
        _write_json(tmp / CONFIG, config)
        versions.commit(tmp, name)  # renamed into place, then CURRENT switched to it; older ones pruned
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if metrics is not None:
        atomic_write_json(d / METRICS, metrics)  # a copy beside the logs, for people and dashboards
    clean_checkpoint_dir(d)
    return d


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The parsed and checked config.json of a checkpoint directory."""
    cfg_path = resolve_checkpoint(path) / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a {FORMAT} config")
    if cfg.get("version") != VERSION:
        raise CheckpointError(f"{cfg_path}: format version {cfg.get('version')} is not supported (expected {VERSION})")
    return cfg


def checkpoint_hash(path: str | Path) -> str:
    """The sha256 of the checkpoint's weights, as recorded in its config.json."""
    return str(read_checkpoint_config(path)["weights_sha256"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> SparcModel:
    """Load a SparcModel from a checkpoint directory; corrupt or mismatched files raise CheckpointError."""
    d = resolve_checkpoint(path)
    cfg = read_checkpoint_config(d)
    try:
        saved = cfg.get("model")
        if isinstance(saved, dict) and "private_latents" not in saved:
            saved = saved | {"private_latents": 0}  # saved before the private dictionary existed
        model_cfg = SparcConfig.model_validate(saved)
    except ValidationError as e:
        raise CheckpointError(f"{d / CONFIG}: invalid model config: {e.errors()[0]['msg']}") from None
    weights = d / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if verify and file_sha256(weights) != cfg.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 does not match {CONFIG} (truncated, corrupt or from another save)")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    model = SparcModel(model_cfg)
    expected = model.state_dict()
    for name in expected:  # saved before calibration existed: uncalibrated (the relative floor applies)
        if name.endswith((".threshold", ".calibrated", ".soft_weight")) and name not in state:
            state[name] = expected[name].clone()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{weights}: {name} has shape {list(t.shape)}, config implies {list(expected[name].shape)}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{weights}: {name} contains NaN or inf")
    model.load_state_dict(state)
    # what the model is (index/manifest.py compares them with the bundles it searches): the weights' hash,
    # and the soft weight they hold (set_soft_weight afterwards makes another code)
    model.checkpoint_sha256 = str(cfg.get("weights_sha256"))
    model.checkpoint_soft_weight = model.soft_weight
    return model.to(device).eval()


def load_train_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a checkpoint's train_state.safetensors (for resume)."""
    f = resolve_checkpoint(path) / TRAIN_STATE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (the checkpoint was saved without resumable state)")
    try:
        tensors = load_file(f)
        with safe_open(f, framework="pt") as sf:
            meta = json.loads((sf.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({e})") from None
    return tensors, meta
