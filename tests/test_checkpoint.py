"""Checkpoint round trip, and clear errors for corrupt, truncated or mismatched checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from sparc_core import CheckpointError, load_checkpoint, save_checkpoint
from sparc_core.checkpoint import atomic_write_bytes, checkpoint_hash


def test_round_trip_gives_identical_outputs(tmp_path, small_model, batch):
    small_model.fit_input_norm(batch)
    path = save_checkpoint(small_model, tmp_path / "ckpt", step=7, metrics={"note": 1})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    loaded = load_checkpoint(path)
    assert loaded.streams == small_model.streams
    for s in small_model.streams:
        a, b = small_model.encode({s: batch[s]}), loaded.encode({s: batch[s]})
        assert torch.equal(a.indices, b.indices)
        assert_close(a.values, b.values, rtol=0, atol=0)
        for t in small_model.streams:
            assert_close(small_model.decode(a, t), loaded.decode(b, t), rtol=0, atol=0)
    assert json.loads((path / "config.json").read_text())["step"] == 7
    assert len(checkpoint_hash(path)) == 64


def test_no_pickle_in_checkpoint(tmp_path, small_model):
    path = save_checkpoint(small_model, tmp_path / "ckpt")
    head = (path / "model.safetensors").read_bytes()[:8]
    assert int.from_bytes(head, "little") < 1_000_000  # a safetensors header length, not a pickle opcode


def test_missing_directory_and_files(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(small_model, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_checkpoint(path)


def test_truncated_weights_are_detected(tmp_path, small_model):
    path = save_checkpoint(small_model, tmp_path / "ckpt")
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 does not match"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors"):
        load_checkpoint(path, verify=False)


def test_corrupt_config_is_named(tmp_path, small_model):
    path = save_checkpoint(small_model, tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt JSON"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a sparc-checkpoint config"):
        load_checkpoint(path)


def test_mismatched_config_and_weights(tmp_path, small_model, small_cfg):
    from sparc_core import SparcModel

    path = save_checkpoint(small_model, tmp_path / "ckpt")
    other = save_checkpoint(SparcModel(small_cfg.model_copy(update={"n_latents": 32, "auxk": 8})), tmp_path / "other")
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
