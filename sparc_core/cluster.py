"""Batch jobs on a Ray cluster (``--engine ray``): the feature extraction here, the index build in
:mod:`index.cluster`.

Ray Data runs them: the work is a dataset of units (an extraction chunk, an index shard), mapped by an actor
pool with ``map_batches`` — one set of models per actor, loaded once, a GPU per actor where the cluster has
GPUs. Ray restarts an actor that dies and retries its unit; every unit is written whole and switched in
atomically by the worker (the same files the local engine writes), so a retried unit replaces nothing
half-done, and a rerun after the driver died skips the units already on disk. The driver holds only the
unit descriptions and the small results, never features.

What the cluster needs: this package (same version) installed on every node with ``sparc[ray]``, and the
weights, images, features and output folder at the same paths on every node (a shared filesystem).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .config import ClusterConfig, ExtractConfig
from .extras import require

log = logging.getLogger(__name__)


@contextmanager
def ray_session(cluster: ClusterConfig) -> Iterator[Any]:
    """The ``ray`` module, connected: to ``cluster.address``, to the cluster this process already joined,
    or to a local one started here (and shut down on exit)."""
    ray = require("ray", "ray", "--engine ray")
    require("ray.data", "ray", "--engine ray")
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if cluster.address:
            kw["address"] = cluster.address
        else:
            kw["num_cpus"] = cluster.num_cpus
        ray.init(**kw)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar, ours
    ctx.print_on_execution_start = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def pool_options(ray: Any, cluster: ClusterConfig) -> tuple[dict[str, Any], int]:
    """``map_batches`` arguments for an actor pool on this cluster (each actor's CPUs and GPUs), and its size."""
    res = ray.cluster_resources()
    gpus = cluster.gpus_per_actor if cluster.gpus_per_actor is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
    if cluster.actors is not None:
        actors = cluster.actors
    elif gpus:
        actors = max(1, int(res.get("GPU", 0) // gpus))
    else:
        actors = max(1, int(res.get("CPU", 1) // cluster.cpus_per_actor))
    # One unit in flight per actor: a unit is long (a chunk, a shard), and the first actor up must not queue
    # every unit while the others start. Ray Data restarts a pool's actors that die and retries their calls
    # (max_restarts / max_task_retries -1 by default).
    pool = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
    return {"compute": pool, "num_cpus": cluster.cpus_per_actor, "num_gpus": gpus}, actors


def run_units(ray: Any, units: list[dict[str, Any]], worker: type, kwargs: dict[str, Any], opts: dict[str, Any],
              total: int, desc: str, progress: bool, weight: str) -> list[dict[str, Any]]:  # fmt: skip
    """Map ``units`` (one dataset row each) through an actor pool of ``worker(**kwargs)``, streaming; returns
    the workers' result rows. The bar advances by each result's ``weight`` field."""
    if not units:
        return []
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(worker, batch_size=1, fn_constructor_kwargs=kwargs, **opts)
    results = []
    with tqdm(total=total, desc=desc, unit="row", disable=not progress) as bar:
        for row in ds.iter_rows():
            results.append(dict(row))
            bar.update(int(row[weight]))
    return results


# ---- extraction ------------------------------------------------------------------------------------------
def _worker_device(cfg: ExtractConfig) -> ExtractConfig:
    """The config a worker loads its encoders with: its GPU if Ray gave it one, else the CPU (unless the
    user named a device)."""
    if cfg.encoders.device != "auto":
        return cfg
    import torch

    device = "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" else "cpu"
    return cfg.model_copy(update={"encoders": cfg.encoders.model_copy(update={"device": device})})


class _Rows:
    """Row ``i`` of the whole caption file for the rows of one chunk (what ``extract_chunk`` indexes)."""

    def __init__(self, lo: int, n_items: int, items: list[Any]) -> None:
        self.lo, self.n, self.items = lo, n_items, items

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.items[i - self.lo]


def _describe(cfg_json: str) -> dict[str, dict[str, Any]]:
    from .encoders import load_encoders
    from .extract import describe_encoders

    cfg = _worker_device(ExtractConfig.model_validate_json(cfg_json))
    return describe_encoders(load_encoders(cfg.encoders))


class ChunkWorker:
    """One actor: the encoders, loaded once; each call encodes and writes the chunks it is given."""

    def __init__(self, cfg_json: str, info: dict[str, dict[str, Any]], fp_hash: str, n_items: int) -> None:
        from .encoders import load_encoders

        self.cfg = _worker_device(ExtractConfig.model_validate_json(cfg_json))
        self.encoders = load_encoders(self.cfg.encoders)
        self.info, self.fp_hash, self.n_items = info, fp_hash, n_items

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .extract import Item, extract_chunk

        done, rejected, seconds = [], [], []
        for c, lo, images, captions, ids in zip(batch["chunk"], batch["lo"], batch["image"], batch["caption"], batch["id"]):
            t0 = time.perf_counter()
            items = [Item(str(a), str(b), str(i)) for a, b, i in zip(images, captions, ids)]
            n, bad = extract_chunk(self.cfg, _Rows(int(lo), self.n_items, items), int(c), self.encoders, self.info, self.fp_hash)
            done.append(n + bad)
            rejected.append(bad)
            seconds.append(time.perf_counter() - t0)
        return {
            "chunk": np.asarray(batch["chunk"]), "rows": np.asarray(done), "rejected": np.asarray(rejected),
            "seconds": np.asarray(seconds),
        }  # fmt: skip


def extract_on_ray(cfg: ExtractConfig, items: list[Any]) -> dict[str, Any]:
    """:func:`sparc_core.extract.extract` with the chunks encoded by an actor pool on a Ray cluster: the same
    files, rows, order and features as the local engine (every chunk's batches are the same)."""
    from .extract import assemble, chunk_rows, plan_chunks

    with ray_session(cfg.cluster) as ray:
        opts, actors = pool_options(ray, cfg.cluster)
        cfg_json = cfg.model_dump_json()
        describe = ray.remote(num_cpus=opts["num_cpus"], num_gpus=opts["num_gpus"])(_describe)
        info = ray.get(describe.remote(cfg_json))
        plan = plan_chunks(cfg, items, info)
        if isinstance(plan, dict):
            return plan
        fp, fp_hash, pending = plan
        units = []
        for c in pending:
            rows = chunk_rows(cfg, len(items), c)
            part = items[rows.start : rows.stop]
            units.append({
                "chunk": c, "lo": rows.start,
                "image": [it.image for it in part], "caption": [it.caption for it in part], "id": [it.id for it in part],
            })  # fmt: skip
        log.info("%d of %d chunks to encode on %d actors", len(units), -(-len(items) // cfg.chunk_size), actors)
        kwargs = {"cfg_json": cfg_json, "info": info, "fp_hash": fp_hash, "n_items": len(items)}
        total = sum(len(u["id"]) for u in units)
        results = run_units(ray, units, ChunkWorker, kwargs, opts, total, "extract (ray)", cfg.progress, "rows")
    engine = {
        "name": "ray", "actors": actors, "chunks_encoded": len(results), "rows_encoded": total,
        "actor_seconds": round(sum(float(r["seconds"]) for r in results), 3),  # time the actors spent on chunks
    }  # fmt: skip
    return assemble(cfg, items, info, fp, fp_hash, engine)
