"""FAISS for the cross-decoded dense path: build, persist, per-call search parameters, GPU placement.

faiss-gpu is used when the installed faiss has GPU support and a CUDA device is visible; each GPU index
has a single owner (a lock), since FAISS GPU indexes are not safe for concurrent use.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sparc_core import SparcError

TRAIN_SAMPLE = 100_000  # rows used to train IVF / PQ / SQ quantizers


class DenseIndexError(SparcError, RuntimeError):
    """A FAISS index that cannot be built or read; the message names the file or factory string."""


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


def gpu_available() -> bool:
    """True when faiss was built with GPU support and sees a device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class DenseSearcher:
    """One FAISS index with its owner lock; moved to a GPU when one is available and asked for."""

    _resources: Any = None

    def __init__(self, index: Any, use_gpu: bool | None = None, gpu: int = 0) -> None:
        self.lock = threading.Lock()
        self.on_gpu = False
        if use_gpu is None:
            use_gpu = gpu_available()
        if use_gpu:
            if not gpu_available():
                raise DenseIndexError("GPU search requested, but faiss has no GPU support or sees no device")
            if DenseSearcher._resources is None:
                DenseSearcher._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(DenseSearcher._resources, gpu, index)
            self.on_gpu = True
        self.index = index

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
