"""An index build on a Ray cluster (``sparc index build --engine ray``): the gallery as N shards built in
parallel by an actor pool, each actor holding the checkpoint once (see :mod:`sparc_core.cluster`).

Every shard is today's shard bundle (``build_bundle(shard=(i, n))``) at ``OUT/shard-0000i``, so
``sparc serve --index NAME=OUT/shard-00000,...`` and ``sparc index export`` take them unchanged, and their
merged top-k is the single-process build's. A shard whose bundle already holds this build (same checkpoint,
features, shard and settings) is skipped: a rerun after a failure builds only what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sparc_core.checkpoint import checkpoint_hash
from sparc_core.cluster import pool_options, ray_session, run_units
from sparc_core.config import ClusterConfig
from sparc_core.data import FeatureStore

from .errors import BundleError
from .manifest import read_manifest
from .seismic_backend import SeismicSettings

log = logging.getLogger(__name__)


def shard_dirs(out: str | Path, n_shards: int) -> list[Path]:
    """Where the shards of an N-shard build live."""
    return [Path(out) / f"shard-{i:05d}" for i in range(n_shards)]


def _built(path: Path, i: int, n: int, ckpt: str, source: str, settings: dict[str, Any]) -> bool:
    """Whether ``path`` already holds shard i/n of this build."""
    if not (path / "CURRENT").is_file():
        return False
    try:
        m = read_manifest(path)
    except BundleError:
        return False
    return (
        m.checkpoint_sha256 == ckpt and m.source == source and (m.shard.index, m.shard.count) == (i, n)
        and len(m.parts) == 1 and m.parts[0].n_deleted == 0
        and m.dense == settings["dense"] and (not m.dense or m.faiss_factory == settings["faiss_factory"])
        and (m.seismic.model_dump() if m.seismic else None) == settings["seismic"] and m.code == settings["code"]
    )  # fmt: skip


class ShardWorker:
    """One actor: the checkpoint, loaded once; each call builds the shards it is given."""

    def __init__(self, checkpoint: str, job: dict[str, Any]) -> None:
        import torch

        from sparc_core.checkpoint import load_checkpoint

        self.checkpoint, self.job = checkpoint, job
        self.model = load_checkpoint(checkpoint, device="cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .bundle import build_bundle

        j, rows = self.job, []
        for i, path in zip(batch["shard"], batch["path"]):
            seismic = SeismicSettings.model_validate(j["seismic"]) if j["seismic"] is not None else None
            build_bundle(
                self.checkpoint, j["stream"], j["features"], str(path), ids=j["ids"], dense=j["dense"],
                faiss_factory=j["faiss_factory"], shard=(int(i), j["n_shards"]), batch_size=j["batch_size"],
                progress=False, model=self.model, seismic=seismic, code=j["code"],
            )  # fmt: skip
            rows.append(read_manifest(path).n_items)
        return {"shard": np.asarray(batch["shard"]), "rows": np.asarray(rows)}


def build_shards(
    checkpoint: str | Path,
    stream: str,
    features: str | Path,
    out: str | Path,
    n_shards: int | None = None,
    engine: str = "ray",
    cluster: ClusterConfig | None = None,
    ids: str | Path | None = None,
    dense: bool | None = None,
    faiss_factory: str = "Flat",
    batch_size: int = 8192,
    seismic: SeismicSettings | None = None,
    progress: bool = True,
    code: str = "search",
) -> list[Path]:
    """Build shards 0..n_shards-1 of one stream's gallery under ``out`` (default: one per actor of the pool),
    on a Ray cluster or (``engine`` "local") one after the other here; returns the shard bundles."""
    if n_shards is not None and n_shards < 1:
        raise BundleError(f"--shards must be at least 1, got {n_shards}")
    if engine not in ("local", "ray"):
        raise BundleError(f"engine {engine!r}: expected local or ray")
    cluster = cluster or ClusterConfig()
    if dense is None:
        from .faiss_backend import faiss_installed

        dense = faiss_installed()
    checkpoint = str(Path(checkpoint).resolve())
    n_rows = FeatureStore(features).n_rows
    source = str(Path(features).resolve())
    job = {
        "stream": stream, "features": source, "ids": str(Path(ids).resolve()) if ids is not None else None,
        "dense": dense, "faiss_factory": faiss_factory, "n_shards": n_shards, "batch_size": batch_size,
        "seismic": seismic.model_dump() if seismic is not None else None, "code": code,
    }  # fmt: skip
    ckpt = checkpoint_hash(checkpoint)

    def plan(n: int) -> tuple[list[Path], list[dict[str, Any]], int]:
        per = -(-n_rows // n)
        if (n - 1) * per >= n_rows:
            raise BundleError(f"{features}: {n_rows} rows cannot fill {n} shards")
        paths = shard_dirs(out, n)
        todo = [i for i, p in enumerate(paths) if not _built(p, i, n, ckpt, source, job)]
        log.info("%d of %d shards to build", len(todo), n)
        return paths, [{"shard": i, "path": str(paths[i])} for i in todo], sum(min(per, n_rows - i * per) for i in todo)

    Path(out).mkdir(parents=True, exist_ok=True)
    if engine == "local":
        job["n_shards"] = n_shards = n_shards or 1
        paths, units, _ = plan(n_shards)
        worker = ShardWorker(checkpoint, job)
        for u in units:
            worker({"shard": np.array([u["shard"]]), "path": np.array([u["path"]])})
    else:
        with ray_session(cluster) as ray:
            opts, actors = pool_options(ray, cluster)
            job["n_shards"] = n_shards = n_shards or actors
            paths, units, rows = plan(n_shards)
            run_units(ray, units, ShardWorker, {"checkpoint": checkpoint, "job": job}, opts, rows, "index build (ray)",
                      progress, "rows")  # fmt: skip
    missing = [str(p) for i, p in enumerate(paths) if not _built(p, i, n_shards, ckpt, source, job)]
    if missing:
        raise BundleError(f"shards not built: {', '.join(missing)}; run the same command again")
    return paths
