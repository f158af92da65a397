"""Feature stores (.npy, .safetensors, .h5; memory-mapped) and block-shuffled paired batches."""

from __future__ import annotations

import json
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import SparcError

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_ST_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}


class FeatureError(SparcError, ValueError):
    """Feature data that cannot be trained or evaluated on; the message names the file and the problem."""


class FeatureStore:
    """One stream's [n_rows, dim] features on disk, read by row without loading the whole file."""

    def __init__(self, path: str | Path) -> None:
        spec = str(path)
        name = None
        if ":" in spec and not Path(spec).exists():
            spec, name = spec.rsplit(":", 1)
        self.path = Path(spec)
        if not self.path.is_file():
            raise FeatureError(f"{self.path}: feature file not found")
        self.ids: np.ndarray | None = None
        self._h5 = None
        suffix = self.path.suffix.lower()
        if suffix == ".npy":
            self._array = self._open_npy()
        elif suffix == ".safetensors":
            self._array = self._open_safetensors(name)
        elif suffix in (".h5", ".hdf5"):
            self._array = self._open_h5(name)
        else:
            raise FeatureError(f"{self.path}: unsupported feature format {suffix!r} (use .npy, .safetensors or .h5)")
        if self._array.ndim != 2:
            raise FeatureError(f"{self.path}: features must be 2-D [rows, dim], got shape {list(self._array.shape)}")
        if not np.issubdtype(self._array.dtype, np.floating):
            raise FeatureError(f"{self.path}: features must be floating point, got {self._array.dtype}")
        if self.ids is not None and len(self.ids) != self.n_rows:
            raise FeatureError(f"{self.path}: {len(self.ids)} ids for {self.n_rows} rows")

    def _open_npy(self) -> np.ndarray:
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise FeatureError(f"{self.path}: not a readable .npy array ({e})") from None
        for sibling in (self.path.with_suffix(".ids.npy"), self.path.with_suffix(".ids.txt")):
            if sibling.is_file():
                self.ids = (
                    np.load(sibling, allow_pickle=False)
                    if sibling.suffix == ".npy"
                    else np.array(sibling.read_text().splitlines())
                )
        return arr

    def _open_safetensors(self, name: str | None) -> np.ndarray:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FeatureError(f"{self.path}: truncated safetensors file")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise FeatureError(f"{self.path}: safetensors header length {hlen} is invalid")
            try:
                header = json.loads(f.read(hlen))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise FeatureError(f"{self.path}: corrupt safetensors header") from None
        header.pop("__metadata__", None)
        tensors = {k: v for k, v in header.items() if isinstance(v, dict) and len(v.get("shape", [])) == 2}
        if name is None:
            name = "features" if "features" in tensors else (next(iter(tensors)) if len(tensors) == 1 else None)
        if name is None or name not in tensors:
            raise FeatureError(f"{self.path}: name the 2-D tensor to use as FILE:NAME (found {sorted(tensors)})")

        def view(key: str, info: dict) -> np.ndarray:
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise FeatureError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if 8 + hlen + end > size or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise FeatureError(f"{self.path}: tensor {key!r} runs past the end of the file (truncated?)")
            return np.memmap(self.path, dtype=dtype, mode="r", offset=8 + hlen + begin, shape=shape)

        if "ids" in header:
            self.ids = np.asarray(view("ids", header["ids"])).reshape(-1)
        return view(name, tensors[name])

    def _open_h5(self, name: str | None) -> np.ndarray:
        from .extras import require

        h5py = require("h5py", "hdf5", "HDF5 feature files")

        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise FeatureError(f"{self.path}: not a readable HDF5 file ({e})") from None
        dsets = {k: v for k, v in self._h5.items() if isinstance(v, h5py.Dataset) and v.ndim == 2}
        if name is None:
            name = "features" if "features" in dsets else (next(iter(dsets)) if len(dsets) == 1 else None)
        if name is None or name not in dsets:
            raise FeatureError(f"{self.path}: name the 2-D dataset to use as FILE:NAME (found {sorted(dsets)})")
        if "ids" in self._h5:
            ids = self._h5["ids"][:]
            self.ids = np.array([i.decode() if isinstance(i, bytes) else i for i in ids])
        return dsets[name]

    @property
    def n_rows(self) -> int:
        return int(self._array.shape[0])

    @property
    def dim(self) -> int:
        return int(self._array.shape[1])

    def read(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim] for arbitrary row ids (read in sorted order for locality)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        if self._h5 is not None:
            uniq, inverse = np.unique(sorted_rows, return_inverse=True)
            block = self._array[uniq][inverse]
        else:
            block = self._array[sorted_rows]
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[order] = block
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """float32 rows [start, stop)."""
        return np.array(self._array[start:stop], dtype=np.float32)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()


class PairedFeatures:
    """Several streams' stores whose rows are paired by position (and by id where ids are given)."""

    def __init__(self, paths: dict[str, str | Path], labels: str | Path | None = None) -> None:
        if not paths:
            raise FeatureError("no feature files given")
        self.stores = {s: FeatureStore(p) for s, p in paths.items()}
        counts = {s: st.n_rows for s, st in self.stores.items()}
        if len(set(counts.values())) != 1:
            raise FeatureError(f"streams have different row counts {counts}; rows must be paired by position")
        with_ids = {s: st.ids for s, st in self.stores.items() if st.ids is not None}
        if len(with_ids) > 1:
            first_s, first = next(iter(with_ids.items()))
            for s, ids in with_ids.items():
                if not np.array_equal(ids.astype(str), first.astype(str)):
                    bad = int(np.argmax(ids.astype(str) != first.astype(str)))
                    raise FeatureError(
                        f"ids of {s!r} ({self.stores[s].path}) and {first_s!r} differ first at row {bad}: "
                        f"{ids[bad]!r} vs {first[bad]!r}"
                    )
        self.ids = next(iter(with_ids.values())) if with_ids else None
        self.labels: np.ndarray | None = None
        if labels is not None:
            lp = Path(labels)
            if not lp.is_file():
                raise FeatureError(f"{lp}: labels file not found")
            self.labels = np.load(lp, mmap_mode="r", allow_pickle=False)
            if self.labels.ndim != 2 or self.labels.shape[0] != self.n_rows:
                raise FeatureError(f"{lp}: labels must be [{self.n_rows}, n_concepts], got {list(self.labels.shape)}")

    @property
    def streams(self) -> list[str]:
        return list(self.stores)

    @property
    def n_rows(self) -> int:
        return next(iter(self.stores.values())).n_rows

    @property
    def dims(self) -> dict[str, int]:
        return {s: st.dim for s, st in self.stores.items()}

    def validate(self, dims: dict[str, int] | None = None, chunk: int = 65536, progress: bool = False) -> None:
        """Check dims against ``dims`` and scan every row for NaN/inf; raise FeatureError naming the row."""
        if dims is not None:
            missing = [s for s in dims if s not in self.stores]
            if missing:
                raise FeatureError(f"no features given for stream(s) {missing}")
            for s, d in dims.items():
                if self.stores[s].dim != d:
                    raise FeatureError(f"{self.stores[s].path}: stream {s!r} has dim {self.stores[s].dim}, expected {d}")
        total = self.n_rows * len(self.stores)
        with tqdm(total=total, desc="checking features", unit="row", disable=not progress, leave=False) as bar:
            for s, st in self.stores.items():
                for start in range(0, st.n_rows, chunk):
                    block = st.read_range(start, min(start + chunk, st.n_rows))
                    finite = np.isfinite(block).all(1)
                    if not finite.all():
                        row = start + int(np.argmin(finite))
                        raise FeatureError(f"{st.path}: row {row} of stream {s!r} contains NaN or inf")
                    bar.update(len(block))

    def read(self, rows: np.ndarray, streams: list[str] | None = None) -> dict[str, np.ndarray]:
        """The paired rows of every (or the named) stream."""
        return {s: self.stores[s].read(rows) for s in (streams or self.streams)}

    def read_range(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {s: st.read_range(start, stop) for s, st in self.stores.items()}

    def close(self) -> None:
        for st in self.stores.values():
            st.close()


class BlockBatcher:
    """Batches of row ids, a pure function of (seed, step): whole contiguous blocks are shuffled each
    epoch, then rows are mixed within windows of ``shuffle_blocks`` blocks. Reading stays sequential
    on disk, and resuming at step t reproduces exactly the batches an uninterrupted run would see."""

    def __init__(self, rows: np.ndarray, batch_size: int, block_size: int, shuffle_blocks: int, seed: int) -> None:
        if len(rows) == 0:
            raise FeatureError("no training rows left (check val_rows against the data size)")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = min(batch_size, len(self.rows))
        self.block_size = block_size
        self.shuffle_blocks = shuffle_blocks
        self.seed = seed
        self.batches_per_epoch = len(self.rows) // self.batch_size
        # (epoch, order) of the last epoch computed: one attribute, swapped whole under the lock, because
        # the trainer and the prefetch thread both ask for batches and meet at epoch boundaries.
        self._cached: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if self._cached is not None and self._cached[0] == epoch:
                return self._cached[1]
            rng = np.random.default_rng([self.seed, epoch])
            n_blocks = -(-len(self.rows) // self.block_size)
            blocks = rng.permutation(n_blocks)
            order = np.concatenate([self.rows[b * self.block_size : (b + 1) * self.block_size] for b in blocks])
            window = self.block_size * self.shuffle_blocks
            for start in range(0, len(order), window):
                rng.shuffle(order[start : start + window])
            self._cached = (epoch, order)
            return order

    def batch(self, step: int) -> np.ndarray:
        """Row ids of batch ``step`` (0-based, counted from the start of training)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        return self._epoch_order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


class Prefetcher:
    """Reads the next batch on a background thread while the current one trains."""

    def __init__(self, data: PairedFeatures, batcher: BlockBatcher, start: int, rank: int = 0, world: int = 1) -> None:
        self.data, self.batcher, self.rank, self.world = data, batcher, rank, world
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._next: Future = self._pool.submit(self._load, start)

    def _load(self, step: int) -> dict[str, np.ndarray]:
        return self.data.read(self.batcher.batch(step)[self.rank :: self.world])

    def get(self, step: int) -> dict[str, np.ndarray]:
        """The batch for ``step``; starts reading ``step + 1``."""
        batch = self._next.result()
        self._next = self._pool.submit(self._load, step + 1)
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
