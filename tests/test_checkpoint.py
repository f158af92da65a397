"""Checkpoint round trip, and clear errors for corrupt, truncated or mismatched checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from sparc_core import CheckpointError, load_checkpoint, save_checkpoint
from sparc_core.checkpoint import atomic_write_bytes, checkpoint_hash, resolve_checkpoint


def test_round_trip_gives_identical_outputs(tmp_path, small_model, batch):
    small_model.fit_input_norm(batch)
    path = save_checkpoint(small_model, tmp_path / "ckpt", step=7, metrics={"note": 1})
    version = resolve_checkpoint(path)
    assert sorted(p.name for p in path.iterdir()) == ["CURRENT", "metrics.json", version.name]
    assert sorted(p.name for p in version.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    loaded = load_checkpoint(path)
    assert loaded.streams == small_model.streams
    for s in small_model.streams:
        a, b = small_model.encode({s: batch[s]}), loaded.encode({s: batch[s]})
        assert torch.equal(a.indices, b.indices)
        assert_close(a.values, b.values, rtol=0, atol=0)
        for t in small_model.streams:
            assert_close(small_model.decode(a, t), loaded.decode(b, t), rtol=0, atol=0)
    assert json.loads((version / "config.json").read_text())["step"] == 7
    assert len(checkpoint_hash(path)) == 64


def test_calibration_round_trips_and_older_checkpoints_serve_the_agreed_code(tmp_path, small_model, batch):
    from safetensors.torch import load_file, save_file

    from sparc_core.checkpoint import file_sha256

    small_model.fit_input_norm(batch)
    small_model.set_thresholds({s: torch.full((small_model.n_latents,), 0.05) for s in small_model.streams})
    small_model.set_soft_weight(0.35)
    path = save_checkpoint(small_model, tmp_path / "ckpt")
    loaded = load_checkpoint(path)
    assert loaded.soft_weight == pytest.approx(0.35)
    for code in ("search", "agreed", "full"):
        assert_close(
            loaded.encode({"dino": batch["dino"]}, code=code).values,
            small_model.encode({"dino": batch["dino"]}, code=code).values,
        )
    # a checkpoint saved before the soft weight existed: weight 0, so its search code is its agreed code
    version = resolve_checkpoint(path)
    state = {k: v for k, v in load_file(version / "model.safetensors").items() if not k.endswith(".soft_weight")}
    save_file(state, version / "model.safetensors")
    cfg = json.loads((version / "config.json").read_text())
    (version / "config.json").write_text(json.dumps(cfg | {"weights_sha256": file_sha256(version / "model.safetensors")}))
    old = load_checkpoint(path)
    assert old.soft_weight == 0.0
    assert_close(old.encode({"dino": batch["dino"]}).values, old.encode({"dino": batch["dino"]}, code="agreed").values)


def test_no_pickle_in_checkpoint(tmp_path, small_model):
    path = resolve_checkpoint(save_checkpoint(small_model, tmp_path / "ckpt"))
    head = (path / "model.safetensors").read_bytes()[:8]
    assert int.from_bytes(head, "little") < 1_000_000  # a safetensors header length, not a pickle opcode


def test_missing_directory_and_files(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope")
    path = resolve_checkpoint(save_checkpoint(small_model, tmp_path / "ckpt"))
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(path)


def test_truncated_weights_are_detected(tmp_path, small_model):
    path = resolve_checkpoint(save_checkpoint(small_model, tmp_path / "ckpt"))
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 does not match"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors"):
        load_checkpoint(path, verify=False)


def test_corrupt_config_is_named(tmp_path, small_model):
    path = resolve_checkpoint(save_checkpoint(small_model, tmp_path / "ckpt"))
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a sparc-checkpoint config"):
        load_checkpoint(path)


def test_mismatched_config_and_weights(tmp_path, small_model, small_cfg):
    from sparc_core import SparcModel

    path = resolve_checkpoint(save_checkpoint(small_model, tmp_path / "ckpt"))
    other = resolve_checkpoint(
        save_checkpoint(SparcModel(small_cfg.model_copy(update={"n_latents": 32, "auxk": 8})), tmp_path / "other")
    )
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    cfg["weights_sha256"] = json.loads((other / "config.json").read_text())["weights_sha256"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape \[32, \d+\], config implies \[64, \d+\]"):
        load_checkpoint(path)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in Path(tmp_path).iterdir()] == ["f.bin"]  # the temp file was removed


def _step(path) -> int:
    return json.loads((resolve_checkpoint(path) / "config.json").read_text())["step"]


def test_saves_are_versions_the_previous_one_stays_loadable(tmp_path, small_model):
    out = tmp_path / "ckpt"
    for step in (10, 20, 30):
        save_checkpoint(small_model, out, step=step)
    versions = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert [v[:9] for v in versions] == ["v00000020", "v00000030"]  # the current one and the one before
    assert (out / "CURRENT").read_text().strip() == versions[-1]
    assert _step(out) == 30
    assert load_checkpoint(out / versions[0]).n_latents == small_model.n_latents  # the previous one loads too
    # what a killed save leaves (a partial version, a temp file) is removed by the next save
    (out / ".partial-v00000040-dead").mkdir()
    (out / ".partial-v00000040-dead" / "model.safetensors").write_bytes(b"x" * 100)
    (out / ".CURRENT.abc.tmp").write_text("v0")
    save_checkpoint(small_model, out, step=40)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert _step(out) == 40


def test_weights_are_readable_by_the_group_and_others(tmp_path, small_model):
    old = os.umask(0o022)
    try:
        path = resolve_checkpoint(save_checkpoint(small_model, tmp_path / "ckpt"))
    finally:
        os.umask(old)
    # the mode the process umask gives (set when the module was imported), never save_file's 0600
    from sparc_core.atomic import UMASK as _UMASK

    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert (path / "model.safetensors").stat().st_mode & 0o044 == 0o044 & ~_UMASK


def test_a_single_version_directory_loads(tmp_path, small_model, batch):
    import shutil

    path = resolve_checkpoint(save_checkpoint(small_model, tmp_path / "ckpt", step=3))
    flat = tmp_path / "flat"
    shutil.copytree(path, flat)  # config.json + model.safetensors directly, as copied by hand
    s = small_model.streams[0]
    assert torch.equal(load_checkpoint(flat).encode({s: batch[s]}).indices, small_model.encode({s: batch[s]}).indices)
    assert resolve_checkpoint(flat) == flat
    assert checkpoint_hash(flat) == checkpoint_hash(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="single-version checkpoint"):
        save_checkpoint(small_model, flat)


# SIGKILL at random moments of a save: tests/test_chaos.py (and bench/chaos.py for many kills).


def test_versioned_dir_switches_atomically_and_prunes_only_what_is_stale(tmp_path):
    """The one helper under checkpoints and bundles: CURRENT moves last; prune keeps the current version,
    ``keep`` before it and any after it (another writer's commit in flight), and removes temp folders of
    writers that are gone but not of live ones."""
    from sparc_core.atomic import VersionedDir

    d = VersionedDir(tmp_path / "x", prefix="v-", temp=".building-", keep=1)
    for name in ("v-1", "v-2", "v-3"):
        tmp = d.begin(name)
        (tmp / "f").write_text(name)
        assert d.commit(tmp, name) == tmp_path / "x" / name
    assert d.current_name() == "v-3" and [p.name for p in d.versions()] == ["v-2", "v-3"]  # v-1 pruned
    (tmp_path / "x" / "v-4").mkdir()  # renamed into place by another writer, CURRENT not switched yet
    dead = tmp_path / "x" / ".building-999999999-v-5"  # a killed writer's temp folder
    dead.mkdir()
    live = d.begin("v-6")  # this process: alive
    assert sorted(d.prune()) == [dead.name]
    assert live.is_dir() and (tmp_path / "x" / "v-4").is_dir() and (tmp_path / "x" / "v-2").is_dir()
    assert not d.valid_name("../v-1") and not d.valid_name(".v-1") and not d.valid_name("w-1")
