"""Shared fixtures: tiny models and tiny planted-concept data, all created on the fly."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from sparc_core import SparcConfig, SparcModel, SynthConfig
from sparc_core.worlds.synthetic import write_synthetic

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


def _synth(tmp_path_factory: pytest.TempPathFactory, name: str, streams: dict[str, int], **kw) -> Path:
    out = tmp_path_factory.mktemp(name)
    write_synthetic(SynthConfig(streams=streams, unit_norm=["clip_img", "clip_txt"], **kw), out)
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synth(tmp_path_factory, "synth", STREAMS, n_train=3000, n_eval=500, n_concepts=24, concepts_per_sample=2.0)


MEDIUM = {"dino": 64, "clip_img": 48, "clip_txt": 48}


@pytest.fixture(scope="session")
def medium_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Planted-concept data big enough for a small model to learn real cross-stream retrieval."""
    return _synth(tmp_path_factory, "medium", MEDIUM, n_train=6000, n_eval=600, n_concepts=48, concepts_per_sample=3.0)


@pytest.fixture(scope="session")
def trained_checkpoint(medium_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SPARC model trained on medium_synth (a few seconds on CPU)."""
    from sparc_core import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "sparc"
    cfg = TrainConfig(
        features={s: str(medium_synth / "train" / f"{s}.npy") for s in MEDIUM},
        out=str(out),
        n_latents=192,
        k=8,
        auxk=32,
        steps=300,
        batch_size=128,
        lr=4e-3,
        val_rows=300,
        eval_every=300,
        save_every=300,
        block_size=1024,
        dead_after=3000,
        revive_after=6000,
        progress=False,
    )
    return train(cfg)


def feature_paths(synth_dir: Path, split: str = "train") -> dict[str, str]:
    return {s: str(synth_dir / split / f"{s}.npy") for s in STREAMS}


@pytest.fixture
def client(server):
    """A client of the module's ``server`` fixture, over a real loopback channel."""
    from service.client import SparcClient

    with SparcClient(f"127.0.0.1:{server.port}") as c:
        yield c


@contextlib.contextmanager
def searching(port: int, queries: np.ndarray, top_k: int, step: int, record) -> Iterator[list]:
    """Three clients searching index "dino" with CLIP-text queries until the block ends; ``record(response)``
    keeps what a test checks; yields the list of the status codes of failed calls."""
    from service.client import SparcClient, make_query, search_request

    errors: list = []
    stop = threading.Event()

    def search_forever(offset: int) -> None:
        with SparcClient(f"127.0.0.1:{port}") as c:
            i = offset
            while not stop.is_set():
                try:
                    record(
                        c.search(search_request(make_query(stream="clip_txt", vector=queries[i % 600]), ["dino"], top_k=top_k))
                    )
                except grpc.RpcError as e:
                    errors.append(e.code())
                i += step

    threads = [threading.Thread(target=search_forever, args=(k,)) for k in range(3)]
    try:
        for t in threads:
            t.start()
        yield errors
    finally:
        stop.set()
        for t in threads:
            t.join()
