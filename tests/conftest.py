"""Shared fixtures: tiny models and tiny planted-concept data, all created on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparc_core import SparcConfig, SparcModel, SynthConfig
from sparc_core.synthetic import write_synthetic

STREAMS = {"dino": 24, "clip_img": 16, "clip_txt": 16}


@pytest.fixture
def small_cfg() -> SparcConfig:
    return SparcConfig(streams=STREAMS, n_latents=64, k=6, auxk=16)


@pytest.fixture
def small_model(small_cfg: SparcConfig) -> SparcModel:
    return SparcModel(small_cfg, seed=3)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {s: torch.randn(20, d, generator=g) for s, d in STREAMS.items()}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(streams=STREAMS, unit_norm=["clip_img", "clip_txt"], n_train=3000, n_eval=500, n_concepts=24,
                      concepts_per_sample=2.0)
    write_synthetic(cfg, out)
    return out


def feature_paths(synth_dir: Path, split: str = "train") -> dict[str, str]:
    return {s: str(synth_dir / split / f"{s}.npy") for s in STREAMS}
