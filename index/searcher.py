"""Searcher: one logical gallery (one or many shards), four search paths, latent filters, explanations.

Paths:
  "sparse":  exact cosine between the query's k-sparse code and every item's code, over posting lists.
  "dense":   the query code decoded by the gallery stream's decoder (cross-reconstruction), then inner
             product against the items' centred unit features with FAISS (exact Flat, or the bundle's
             approximate factory).
  "approx":  the posting lists read highest impact first up to a budget, the best candidates rescored
             exactly (index/postings.py; every bundle has it).
  "seismic": Seismic's candidates rescored exactly (bundles given a Seismic index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sparc_core import SparcModel, SparseCode, load_checkpoint

from .bundle import Bundle, BundleError, checkpoint_of, shards_share_ids
from .faiss_backend import DenseSearcher
from .postings import MAX_CANDIDATES, SearchStopped, merge_topk, warm_up

MAX_FILTER_CANDIDATES = 65_536  # dense path with latent filters: the most candidates fetched per query
QUERY_CHUNK = 256  # queries searched between checks of should_stop
SearchPath = Literal["sparse", "dense", "approx", "seismic"]
PATHS = ("sparse", "dense", "approx", "seismic")
DEFAULT_PATH: SearchPath = "sparse"  # faster and smaller at every gallery size measured (bench/index_search.py)


@dataclass
class Explanation:
    """One shared latent's part in a hit's score."""

    latent: int
    query_value: float
    item_value: float
    contribution: float


@dataclass
class SearchResult:
    """Top-k hits of a batch of queries: ids[q] and scores[q] are best first (shorter when fewer hits)."""

    ids: list[list[Any]]
    scores: list[list[float]]
    path: SearchPath
    shards: list[list[int]] = field(default_factory=list)  # which shard each hit came from


def _unit_code(code: SparseCode) -> tuple[np.ndarray, np.ndarray]:
    vals = torch.nn.functional.normalize(code.values.float(), dim=1)
    return code.indices.cpu().numpy(), vals.cpu().numpy()


class Searcher:
    """Search one gallery (all shards of one bundle family) with queries from any stream."""

    def __init__(
        self,
        bundles: list[str | Path] | str | Path,
        model: SparcModel | None = None,
        checkpoint: str | Path | None = None,
        use_gpu: bool | None = None,
        mmap: bool = True,
        gpus: list[int] | None = None,
        shard_gpus: bool = False,
    ) -> None:
        """``gpus``: the GPUs that hold the dense indexes ([] = CPU; None = ``use_gpu``'s choice, by default
        every GPU faiss sees); over several GPUs each index is replicated, or sharded with ``shard_gpus``."""
        paths = [bundles] if isinstance(bundles, (str, Path)) else list(bundles)
        if not paths:
            raise BundleError("no bundles given")
        first = Bundle(paths[0], mmap=mmap)
        expected = first.manifest.checkpoint_sha256
        self.shards = [first] + [Bundle(p, expected_checkpoint=expected, mmap=mmap) for p in paths[1:]]
        m = first.manifest
        for b in self.shards[1:]:
            bm = b.manifest
            if (bm.stream, bm.n_latents, bm.k, bm.dim, bm.id_kind) != (m.stream, m.n_latents, m.k, m.dim, m.id_kind):
                raise BundleError(f"{b.path}: shard does not match {first.path} (stream, latents, k, dim or id kind)")
        if model is None:
            if checkpoint is None:
                checkpoint = checkpoint_of(first.path, m)
            from sparc_core import checkpoint_hash

            if checkpoint_hash(checkpoint) != expected:
                raise BundleError(f"{checkpoint}: is not the checkpoint the index was built with ({expected[:12]})")
            model = load_checkpoint(checkpoint)
        if model.n_latents != m.n_latents or m.stream not in model.streams:
            raise BundleError(f"{first.path}: built for stream {m.stream!r} with {m.n_latents} latents; the model does not match")
        self.model = model
        self.stream = m.stream
        self.manifest = m
        warm_up()  # compile (or load the cached) search kernels now, not on the first query
        for b in self.shards:  # ... and for this gallery's own array types (memory-mapped, read-only)
            for part in b.parts:
                part.postings.warm_up(part.codes_idx, part.codes_val)
        self.dense = [
            [DenseSearcher(p.dense_index, use_gpu=use_gpu, gpus=gpus, shard=shard_gpus) for p in b.parts]
            if b.manifest.dense
            else None
            for b in self.shards
        ]
        shared = shards_share_ids(self.shards)
        if shared:
            raise BundleError(f"the same item id appears in more than one shard, e.g. {shared}")

    @property
    def n_items(self) -> int:
        return sum(b.manifest.n_items for b in self.shards)

    @property
    def has_seismic(self) -> bool:
        return all(b.manifest.approx is not None for b in self.shards)

    # ---- queries ----------------------------------------------------------------------------------
    def encode(self, stream: str, vectors: np.ndarray | torch.Tensor) -> SparseCode:
        """The shared sparse code of raw feature vectors of ``stream`` [n, d] (see ``encode_queries``)."""
        return encode_queries(self.model, stream, vectors)

    def _dense_queries(self, code: SparseCode) -> np.ndarray:
        return dense_queries(self.model, self.stream, code)

    def search(
        self,
        query: SparseCode | tuple[str, np.ndarray],
        top_k: int = 10,
        path: SearchPath | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        require: list[int] | None = None,
        exclude: list[int] | None = None,
        boost: dict[int, float] | None = None,
        should_stop: Callable[[], bool] | None = None,
        query_cut: int | None = None,
        heap_factor: float | None = None,
        budget: float | None = None,
        candidates: int | None = None,
    ) -> SearchResult:
        """Top-k items for each query (a SparseCode, or (stream, vectors) to encode first).

        path "approx": the posting lists read highest impact first up to ``budget`` (share of the query's
        postings, in (0, 1]), the best ``candidates`` rows rescored exactly (index/postings.py); filters
        apply inside. path "seismic": Seismic's candidates rescored exactly (``query_cut``, ``heap_factor``
        per call, else the bundle's defaults; bundles given a Seismic index by `sparc index seismic`); with
        latent filters it runs the exact sparse kernel, where filters are cheap.

        require / exclude: latents an item must / must not have active (inside the posting-list search on
        the sparse path; on the dense path over at most MAX_FILTER_CANDIDATES candidates per query, so
        fewer than top_k hits may come back). boost: latent -> weight added to the query's (unit) code
        before scoring (sparse path) or decoding (dense path). should_stop: polled between chunks of
        queries; once true the search raises SearchStopped.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        code = query if isinstance(query, SparseCode) else self.encode(*query)
        path = path or DEFAULT_PATH
        if path not in PATHS:
            raise ValueError(f"unknown search path {path!r} (use one of {', '.join(PATHS)})")
        if path == "seismic" and any(b.manifest.approx is None for b in self.shards):
            raise BundleError(f"{self.shards[0].path}: has no Seismic index; add one with `sparc index seismic`")
        if path == "seismic" and (require or exclude):
            path = "sparse"
        if budget is not None and not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        if candidates is not None and not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be in [1, {MAX_CANDIDATES}], got {candidates}")
        if path == "dense" and any(d is None for d in self.dense):
            raise BundleError(f"{self.shards[0].path}: built without a dense index; use the sparse path")
        q_idx, q_val, require_l, exclude_l = query_arrays(code, self.model.n_latents, require, exclude, boost)
        ids, scores, shards = [], [], []
        for a in range(0, len(q_idx), QUERY_CHUNK):  # chunks: a stopped call stops within one chunk
            if should_stop is not None and should_stop():
                raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
            qi, qv = q_idx[a : a + QUERY_CHUNK], q_val[a : a + QUERY_CHUNK]
            if path in ("sparse", "approx", "seismic"):  # filters run inside the posting-list search
                D, refs = self._search_all(
                    qi, qv, top_k, path, nprobe, ef_search, require_l, exclude_l, should_stop,
                    (query_cut, heap_factor, budget, candidates),
                )  # fmt: skip
            else:
                D, refs = self._dense_filtered(qi, qv, top_k, nprobe, ef_search, require_l, exclude_l)
            for d, r in zip(D, refs):
                d, r = d[:top_k], r[:top_k]
                row_ids: list[Any] = [None] * len(r)
                for s in np.unique(r[:, 0]) if len(r) else []:
                    sel = np.flatnonzero(r[:, 0] == s)
                    for j, v in zip(sel.tolist(), self.shards[int(s)].ids_at(r[sel, 1])):
                        row_ids[j] = v
                ids.append(row_ids)
                scores.append([float(x) for x in d])
                shards.append([int(s) for s, _ in r])
        return SearchResult(ids=ids, scores=scores, path=path, shards=shards)

    def _dense_filtered(self, q_idx, q_val, top_k, nprobe, ef_search, require, exclude):
        """Dense search; with latent filters, candidates are fetched in growing rounds (at most
        MAX_FILTER_CANDIDATES per query) and filtered on their stored codes, vectorised."""
        if not (require or exclude):
            return self._search_all(q_idx, q_val, top_k, "dense", nprobe, ef_search)
        fetch = min(self.n_items, max(4 * top_k, 64))
        while True:
            D, refs = self._search_all(q_idx, q_val, fetch, "dense", nprobe, ef_search)
            keep = [self._passes(r, require, exclude) for r in refs]
            if all(int(k.sum()) >= top_k for k in keep) or fetch >= min(self.n_items, MAX_FILTER_CANDIDATES):
                return [d[k] for d, k in zip(D, keep)], [r[k] for r, k in zip(refs, keep)]
            fetch = min(self.n_items, MAX_FILTER_CANDIDATES, fetch * 4)

    def _passes(self, refs: np.ndarray, require: list[int], exclude: list[int]) -> np.ndarray:
        """Whether each (shard, row) item has every required latent active and no excluded one."""
        mask = np.ones(len(refs), dtype=bool)
        for s in np.unique(refs[:, 0]) if len(refs) else []:
            sel = refs[:, 0] == s
            b = self.shards[int(s)]
            rows = refs[sel, 1]
            idx, val = b.codes(rows)
            on = np.where(val > 0, idx, -1)
            ok = np.ones(len(rows), dtype=bool)
            for lat in require:
                ok &= (on == lat).any(1)
            if exclude:
                ok &= ~np.isin(on, exclude).any(1)
            mask[sel] = ok
        return mask

    def _search_all(
        self, q_idx, q_val, k, path, nprobe, ef_search, require=None, exclude=None, should_stop=None,
        approx=(None, None, None, None),
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
        """Search every shard and merge: per query, scores desc and (shard, row) refs."""
        per_shard = []
        xq = None
        for s, b in enumerate(self.shards):
            kk = min(k, b.manifest.n_items)
            if path == "sparse":
                D, I = b.search_sparse(q_idx, q_val, kk, require=require, exclude=exclude, should_stop=should_stop)
            elif path == "approx":
                D, I = b.search_approx(q_idx, q_val, kk, approx[2], approx[3], require=require, exclude=exclude,
                                       should_stop=should_stop)  # fmt: skip
            elif path == "seismic":
                D, I = b.search_seismic(q_idx, q_val, kk, approx[0], approx[1], should_stop=should_stop)
            else:
                if xq is None:
                    n = self.model.n_latents
                    xq = self._dense_queries(SparseCode(torch.from_numpy(q_idx.astype(np.int64)), torch.from_numpy(q_val), n))
                parts = []
                for part, dense in zip(b.parts, self.dense[s]):
                    Dp, Ip = dense.search(xq, min(kk, part.n_items), nprobe=nprobe, ef_search=ef_search)
                    parts.append((Dp, np.where(Ip >= 0, Ip + part.row0, -1)))
                D, I = merge_topk(parts, kk)
            per_shard.append((s, D, I))
        out_D, out_R = [], []
        for q in range(q_idx.shape[0]):
            d_parts, r_parts = [], []
            for s, D, I in per_shard:
                valid = I[q] >= 0
                d_parts.append(D[q][valid])
                r_parts.append(np.stack([np.full(int(valid.sum()), s), I[q][valid]], axis=1))
            d = np.concatenate(d_parts)
            r = np.concatenate(r_parts) if r_parts else np.zeros((0, 2), dtype=np.int64)
            order = np.argsort(-d, kind="stable")[:k]
            out_D.append(d[order])
            out_R.append(r[order].astype(np.int64))
        return out_D, out_R

    def latent_top_items(self, latent: int, top_k: int) -> tuple[int, list[tuple[Any, float]]]:
        """Items with the largest value of ``latent`` and how many items have it active."""
        found: list[tuple[float, Any]] = []
        n_active = 0
        for shard in self.shards:
            rows, values = shard.posting(latent)
            n_active += len(rows)
            top = np.argsort(-values, kind="stable")[:top_k]
            found.extend(zip(values[top].tolist(), shard.ids_at(rows[top])))
        found.sort(key=lambda t: -t[0])
        return n_active, [(item, v) for v, item in found[:top_k]]

    # ---- explanations -----------------------------------------------------------------------------
    def item_code(self, item_id: Any) -> tuple[np.ndarray, np.ndarray]:
        """An item's stored code (latent ids, unit values)."""
        for b in self.shards:
            try:
                row = b.row_of(item_id)
            except (KeyError, ValueError):
                continue
            idx, val = b.codes([row])
            return idx[0], val[0]
        raise KeyError(f"item {item_id!r} is not in this index")

    def explain(self, query: SparseCode, item_id: Any, top: int = 5, row: int = 0) -> list[Explanation]:
        """The shared latents that contribute most to the (sparse) score of ``item_id`` for query ``row``."""
        q_idx, q_val = _unit_code(SparseCode(query.indices[row : row + 1], query.values[row : row + 1], query.n_latents))
        i_idx, i_val = self.item_code(item_id)
        item = dict(zip(i_idx.tolist(), i_val.tolist()))
        shared = []
        for lat, qv in zip(q_idx[0].tolist(), q_val[0].tolist()):
            iv = item.get(lat, 0.0)
            if qv > 0 and iv > 0:
                shared.append(Explanation(lat, qv, iv, qv * iv))
        shared.sort(key=lambda e: -e.contribution)
        return shared[:top]


def encode_queries(model: SparcModel, stream: str, vectors: np.ndarray | torch.Tensor) -> SparseCode:
    """The shared sparse code of raw feature vectors of ``stream`` [n, d]; a wrong stream, shape, or a
    row with NaN/inf raises BundleError naming it."""
    if stream not in model.cfg.streams:
        raise BundleError(f"unknown query stream {stream!r}; the model has {model.streams}")
    arr = np.asarray(vectors, dtype=np.float32)
    dim = model.cfg.streams[stream]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise BundleError(f"stream {stream!r} takes [n, {dim}] vectors, got shape {list(arr.shape)}")
    bad = np.flatnonzero(~np.isfinite(arr).all(1))
    if len(bad):
        raise BundleError(f"query row {int(bad[0])} contains NaN or inf ({len(bad)} such rows)")
    return model.encode({stream: torch.as_tensor(arr).to(model.device)})


def dense_queries(model: SparcModel, gallery_stream: str, code: SparseCode) -> np.ndarray:
    """Query codes decoded into the gallery stream (cross-reconstruction), centred and unit: the dense path's
    query vectors."""
    codec = model.codecs[gallery_stream]
    decoded = model.decode(code.to(model.device), gallery_stream, "normalized") - codec.b_dec
    return torch.nn.functional.normalize(decoded.float(), dim=1).detach().cpu().numpy()


def query_arrays(
    code: SparseCode, n_latents: int, require: list[int] | None, exclude: list[int] | None, boost: dict[int, float] | None
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """(latent ids, unit weights with boosts applied, required, excluded) of a batch of query codes; a latent
    out of range raises ValueError."""
    for lat in [*(require or []), *(exclude or []), *((boost or {}).keys())]:
        if not 0 <= int(lat) < n_latents:
            raise ValueError(f"latent {lat} is out of range [0, {n_latents})")
    q_idx, q_val = _unit_code(code)
    if boost:
        q_idx, q_val = _boosted(q_idx, q_val, boost)
    return q_idx, q_val, sorted({int(x) for x in require or []}), sorted({int(x) for x in exclude or []})


def open_gallery(
    locations: list[str] | str,
    model: SparcModel,
    use_gpu: bool | None = None,
    gpus: list[int] | None = None,
    shard_gpus: bool = False,
    checkpoint_sha256: str | None = None,
) -> Any:
    """A searcher over bundle directories (a Searcher) or one Milvus collection (milvus://, milvus-lite:).
    ``gpus`` / ``shard_gpus``: where the bundles' dense indexes live (see Searcher); ``checkpoint_sha256``:
    a Milvus collection exported from another checkpoint is refused."""
    locations = [locations] if isinstance(locations, (str, Path)) else list(locations)
    if any(str(x).startswith(("milvus://", "milvus-lite:")) for x in locations):
        if len(locations) != 1:
            raise BundleError("a Milvus index is one collection: give one milvus:// location (Milvus shards it itself)")
        from .milvus_backend import MilvusSearcher

        return MilvusSearcher(str(locations[0]), model, checkpoint_sha256=checkpoint_sha256)
    return Searcher(locations, model=model, use_gpu=use_gpu, gpus=gpus, shard_gpus=shard_gpus)


def _boosted(q_idx: np.ndarray, q_val: np.ndarray, boost: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    extra = np.array(sorted(boost), dtype=q_idx.dtype)
    idx = np.concatenate([q_idx, np.broadcast_to(extra, (len(q_idx), len(extra)))], axis=1)
    val = np.concatenate([q_val, np.zeros((len(q_val), len(extra)), dtype=q_val.dtype)], axis=1)
    for j, lat in enumerate(extra.tolist()):
        col = q_idx.shape[1] + j
        present = q_idx == lat
        val[:, col] = boost[lat] + np.where(present.any(1), (q_val * present).sum(1), 0.0)
        val[:, : q_idx.shape[1]][present] = 0.0
    return idx, val


def warm_kernel_cache(n_items: int = (1 << 16) + 4096) -> None:
    """Compile every search kernel into numba's on-disk cache (``NUMBA_CACHE_DIR``) for galleries as they are
    served (memory-mapped, read-only arrays; two blocks, so the lone-query kernels too). A container image
    runs this at build time, so a fresh container loads compiled kernels instead of compiling them."""
    import tempfile

    from sparc_core import SparcConfig, save_checkpoint

    from .bundle import build_bundle

    with tempfile.TemporaryDirectory(prefix="sparc-warm-") as d:
        root = Path(d)
        model = SparcModel(SparcConfig(streams={"x": 8, "y": 8}, n_latents=64, k=4))
        save_checkpoint(model, root / "ckpt")
        np.save(root / "x.npy", np.random.default_rng(0).standard_normal((n_items, 8)).astype(np.float32))
        build_bundle(root / "ckpt", "x", root / "x.npy", root / "bundle", progress=False)
        Searcher(root / "bundle", checkpoint=root / "ckpt")  # loading runs every kernel once
