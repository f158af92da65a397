"""FAISS for the cross-decoded dense path: build, persist, per-call search parameters, GPU placement.

FAISS is an optional dependency, imported on first use: ``pip install "sparc[cpu]"`` (faiss-cpu) or, on
CUDA machines, ``"sparc[gpu]"`` (faiss-gpu). Which GPUs hold the dense indexes is a setting
(``parse_gpus``: "none", "all" or a list such as "0,1"); over several GPUs an index is replicated (every
GPU answers whole queries) or sharded (``shard=True``: each holds a slice, for indexes larger than one
GPU), with faiss's own ``index_cpu_to_gpus_list``. An index type FAISS cannot run on a GPU (HNSW, for
one) stays on the CPU, with one log line. Each index has a single owner (a lock), since FAISS GPU indexes
are not safe for concurrent use.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from sparc_core import SparcError
from sparc_core.extras import LazyModule

log = logging.getLogger("sparc.index")

TRAIN_SAMPLE = 100_000  # rows used to train IVF / PQ / SQ quantizers


class DenseIndexError(SparcError, RuntimeError):
    """A FAISS index that cannot be built or read; the message names the file or factory string."""


def _lazy_faiss() -> Any:
    return LazyModule(
        "faiss",
        "cpu",
        "dense indexes",
        DenseIndexError,
        " (or 'sparc[gpu]' on a CUDA machine), or build the bundle with --no-dense",
    )


faiss: Any = _lazy_faiss()  # imported on first use


def faiss_installed() -> bool:
    """Whether a FAISS package (faiss-cpu or faiss-gpu) can be imported."""
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


class DenseBuilder:
    """Builds an inner-product FAISS index from vectors given in chunks: a quantizer that needs training
    is trained on the first TRAIN_SAMPLE vectors (held until then), everything else is added as it comes."""

    def __init__(self, d: int, factory: str = "Flat") -> None:
        try:
            flat = factory == "Flat"
            self.index = faiss.IndexFlatIP(d) if flat else faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise DenseIndexError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[0]}") from None
        self.factory = factory
        self._held: list[np.ndarray] = []
        self._n_held = 0

    def add(self, xb: np.ndarray) -> None:
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        if self.index.is_trained:
            self.index.add(xb)
            return
        self._held.append(xb)
        self._n_held += len(xb)
        if self._n_held >= TRAIN_SAMPLE:
            self._train()

    def _train(self) -> None:
        held = np.concatenate(self._held)
        self._held, self._n_held = [], 0
        try:
            self.index.train(held[:TRAIN_SAMPLE])
        except RuntimeError as e:
            raise DenseIndexError(f"training {self.factory!r} on {len(held)} vectors failed: {str(e).splitlines()[-1]}") from None
        self.index.add(held)

    def finish(self) -> Any:
        if not self.index.is_trained:
            if not self._n_held:
                raise DenseIndexError(f"no vectors to train {self.factory!r} on")
            self._train()
        return self.index


def write_dense_index(index: Any, path: Path) -> None:
    """Persist a (CPU) FAISS index."""
    if hasattr(faiss, "index_gpu_to_cpu") and _is_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    faiss.write_index(index, str(path))


def read_dense_index(path: Path) -> Any:
    """Read a FAISS index; a truncated or corrupt file raises an error naming it."""
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise DenseIndexError(f"{path}: unreadable FAISS index ({str(e).splitlines()[0]})") from None


def _is_gpu(index: Any) -> bool:
    return "Gpu" in type(index).__name__


def gpu_count() -> int:
    """GPUs the installed faiss can use (0 without faiss-gpu or without a device)."""
    if not faiss_installed():
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees a device."""
    return gpu_count() > 0


def parse_gpus(spec: str | None, device: str = "auto") -> list[int]:
    """The GPUs that hold dense indexes: "none", "all" (every GPU faiss sees) or "0,1".

    ``None`` follows the model's device: no GPU when it is "cpu", else every GPU faiss sees. Naming a GPU
    faiss does not see, or asking for GPUs without faiss-gpu, is an error that says so."""
    spec = (spec or ("none" if device == "cpu" else "all")).strip().lower()
    if spec == "none":
        return []
    n = gpu_count()
    if spec == "all":
        return list(range(n))
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise DenseIndexError(f"faiss_gpus {spec!r}: expected none, all or GPU numbers such as 0,1") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise DenseIndexError(f"faiss_gpus {spec!r}: expected distinct GPU numbers such as 0,1")
    if max(ids) >= n:
        have = f"it sees {n} GPU(s)" if n else "it has no GPU support or sees no device (install sparc[gpu])"
        raise DenseIndexError(f"faiss_gpus {spec!r}: GPU {max(ids)} is not available to faiss; {have}")
    return ids


class DenseSearcher:
    """One FAISS index with its owner lock, on the CPU or on ``gpus`` (replicated, or sharded with
    ``shard=True``). ``use_gpu`` (older callers): True = GPU ``gpu``, None = every GPU faiss sees."""

    _resources: dict[int, Any] = {}

    def __init__(
        self, index: Any, use_gpu: bool | None = None, gpu: int = 0, gpus: list[int] | None = None, shard: bool = False
    ) -> None:
        self.lock = threading.Lock()
        self.on_gpu = False
        self.gpus: list[int] = []
        if gpus is None:
            if use_gpu is None:
                gpus = list(range(gpu_count()))
            elif use_gpu:
                if not gpu_available():
                    raise DenseIndexError("GPU search requested, but faiss has no GPU support or sees no device")
                gpus = [gpu]
            else:
                gpus = []
        if gpus:
            index = self._to_gpus(index, gpus, shard)
        self.index = index

    def _to_gpus(self, index: Any, gpus: list[int], shard: bool) -> Any:
        try:
            if len(gpus) == 1:
                if gpus[0] not in DenseSearcher._resources:
                    DenseSearcher._resources[gpus[0]] = faiss.StandardGpuResources()
                res = DenseSearcher._resources[gpus[0]]
                moved = faiss.index_cpu_to_gpu(res, gpus[0], index)
            else:
                co = faiss.GpuMultipleClonerOptions()
                co.shard = shard
                moved = faiss.index_cpu_to_gpus_list(index, co=co, gpus=gpus)
        except (RuntimeError, AttributeError) as e:  # an index type FAISS cannot place on a GPU
            log.warning(
                "FAISS index %s cannot run on GPU(s) %s (%s); it stays on the CPU",
                type(faiss.downcast_index(index)).__name__,
                gpus,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            return index
        self.on_gpu, self.gpus = True, list(gpus)
        return moved

    def search(
        self, xq: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) for queries [nq, d]; search parameters apply to this call only."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        params = search_parameters(self.index, nprobe, ef_search)
        with self.lock:
            if params is None:
                return self.index.search(xq, k)
            return self.index.search(xq, k, params=params)


def search_parameters(index: Any, nprobe: int | None, ef_search: int | None) -> Any | None:
    """Per-call FAISS SearchParameters (never mutate the shared index's nprobe / efSearch)."""
    if nprobe is None and ef_search is None:
        return None
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if nprobe is not None and isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    if ef_search is not None and isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=int(ef_search))
    if _is_gpu(index) and nprobe is not None:
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    return None
