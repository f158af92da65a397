"""Searcher: one gallery of local bundles (one or many shards), four search paths, latent filters,
explanations.

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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparc_core import SparcModel, SparseCode, checkpoint_hash, load_checkpoint

from .errors import BundleError, SearchStopped
from .faiss_backend import DenseSearcher
from .gallery import ExplainsFromCodes, GalleryInfo
from .kernels import merge_topk
from .manifest import MANIFEST, checkpoint_of, require_checkpoint, require_model
from .merge import gather, merge_order
from .params import DEFAULT_PATH, PATHS, DenseParams, ExactParams, PathParams, SearchParams, SearchPath
from .postings import warm_up
from .queries import Explanation, SearchResult, as_code, dense_arrays, encode_queries, params_arrays
from .reader import Bundle, drop_deleted, shards_share_ids

MAX_FILTER_CANDIDATES = 65_536  # dense path with latent filters: the most candidates fetched per query
QUERY_CHUNK = 256  # queries searched between checks of should_stop

__all__ = [
    "DEFAULT_PATH", "PATHS", "Explanation", "Searcher", "SearchPath", "SearchResult", "warm_kernel_cache",
]  # fmt: skip


class Searcher(ExplainsFromCodes):
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
        checkpoint_sha256: str | None = None,
    ) -> None:
        """``gpus``: the GPUs that hold the dense indexes ([] = CPU; None = ``use_gpu``'s choice, by default
        every GPU faiss sees); over several GPUs each index is replicated, or sharded with ``shard_gpus``.
        ``checkpoint_sha256``: the hash of ``model``'s checkpoint, which the bundles must record."""
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
        if checkpoint_sha256 is not None:
            require_checkpoint(expected, checkpoint_sha256, first.vdir / MANIFEST)
        if model is None:
            if checkpoint is None:
                checkpoint = checkpoint_of(first.path, m)
            require_checkpoint(expected, checkpoint_hash(checkpoint), first.vdir / MANIFEST,
                               remedy=f"{checkpoint} is another model: give the index's own checkpoint")  # fmt: skip
            model = load_checkpoint(checkpoint)
        if model.n_latents != m.n_latents or m.stream not in model.streams:
            raise BundleError(f"{first.path}: built for stream {m.stream!r} with {m.n_latents} latents; the model does not match")
        require_model(m, model, first.vdir / MANIFEST, checkpoint_sha256)
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
        return sum(b.n_live for b in self.shards)

    @property
    def has_seismic(self) -> bool:
        return all(b.manifest.seismic is not None for b in self.shards)

    def info(self) -> GalleryInfo:
        dense = all(d is not None for d in self.dense)
        version = ",".join(b.vdir.name for b in self.shards)
        return GalleryInfo(self.stream, self.n_items, len(self.shards), self.manifest, dense, self.has_seismic, version=version)

    # ---- queries ----------------------------------------------------------------------------------
    def encode(self, stream: str, vectors: Any) -> SparseCode:
        """The shared sparse code of raw feature vectors of ``stream`` [n, d] (see ``encode_queries``)."""
        return encode_queries(self.model, stream, vectors, self.manifest.code)

    def search(
        self,
        query: SparseCode | tuple[str, np.ndarray],
        params: SearchParams | None = None,
        should_stop: Callable[[], bool] | None = None,
        **options: Any,
    ) -> SearchResult:
        """Top-k items for each query (a SparseCode, or (stream, vectors) to encode first), as ``params``
        says (or the keywords of ``SearchParams.create``: top_k, path, require, exclude, boost, nprobe,
        ef_search, query_cut, heap_factor, budget, candidates).

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
        params = SearchParams.of(params, **options)
        code = as_code(self.model, query, self.manifest.code)
        path: SearchPath = params.path
        settings: PathParams = params.settings
        if path == SearchPath.SEISMIC and not self.has_seismic:
            raise BundleError(f"{self.shards[0].path}: has no Seismic index; add one with `sparc index seismic`")
        if path == SearchPath.SEISMIC and (params.require or params.exclude):
            path, settings = SearchPath.SPARSE, ExactParams()
        if path == SearchPath.DENSE and any(d is None for d in self.dense):
            raise BundleError(f"{self.shards[0].path}: built without a dense index; use the sparse path")
        q_idx, q_val, require, exclude = params_arrays(code, self.model.n_latents, params)
        top_k = params.top_k
        ids, scores, shards, locs = [], [], [], []
        for a in range(0, len(q_idx), QUERY_CHUNK):  # chunks: a stopped call stops within one chunk
            if should_stop is not None and should_stop():
                raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
            qi, qv = q_idx[a : a + QUERY_CHUNK], q_val[a : a + QUERY_CHUNK]
            if path == SearchPath.DENSE:
                assert isinstance(settings, DenseParams)
                D, refs = self._dense_filtered(qi, qv, top_k, settings, require, exclude)
            else:  # filters run inside the posting-list search
                D, refs = self._search_all(qi, qv, top_k, path, settings, require, exclude, should_stop)
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
                locs.append(self._locs(r))
        return SearchResult(ids=ids, scores=scores, path=path, shards=shards, locs=locs)

    def _locs(self, refs: np.ndarray) -> np.ndarray:
        """(shard, part, row in the shard) [n, 3] of (shard, row) refs."""
        out = np.zeros((len(refs), 3), dtype=np.int64)
        if len(refs):
            out[:, 0], out[:, 2] = refs[:, 0], refs[:, 1]
            for s in np.unique(refs[:, 0]).tolist():
                sel = refs[:, 0] == s
                out[sel, 1] = self.shards[s].part_at(refs[sel, 1])
        return out

    def _dense_filtered(
        self, q_idx: np.ndarray, q_val: np.ndarray, top_k: int, settings: DenseParams, require: list[int], exclude: list[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Dense search; with latent filters, candidates are fetched in growing rounds (at most
        MAX_FILTER_CANDIDATES per query) and filtered on their stored codes, vectorised."""
        if not (require or exclude):
            return self._search_all(q_idx, q_val, top_k, SearchPath.DENSE, settings)
        fetch = min(self.n_items, max(4 * top_k, 64))
        while True:
            D, refs = self._search_all(q_idx, q_val, fetch, SearchPath.DENSE, settings)
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
        self, q_idx: np.ndarray, q_val: np.ndarray, k: int, path: SearchPath, settings: PathParams,
        require: list[int] | None = None, exclude: list[int] | None = None, should_stop: Callable[[], bool] | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
        """Search every shard and merge: per query, scores desc and (shard, row) refs."""
        per_shard = []
        xq = None
        for s, b in enumerate(self.shards):
            kk = min(k, b.manifest.n_items)
            if path == SearchPath.SPARSE:
                D, I = b.search_sparse(q_idx, q_val, kk, require=require, exclude=exclude, should_stop=should_stop)
            elif path == SearchPath.APPROX:
                D, I = b.search_approx(q_idx, q_val, kk, settings, require=require, exclude=exclude,  # type: ignore[arg-type]
                                       should_stop=should_stop)  # fmt: skip
            elif path == SearchPath.SEISMIC:
                D, I = b.search_seismic(q_idx, q_val, kk, settings, should_stop=should_stop)  # type: ignore[arg-type]
            else:
                assert isinstance(settings, DenseParams)
                if xq is None:
                    xq = dense_arrays(self.model, self.stream, q_idx, q_val)
                parts = []
                for part, dense in zip(b.parts, self.dense[s]):
                    want = min(kk + len(part.deleted), part.n_items)
                    Dp, Ip = dense.search(xq, want, nprobe=settings.nprobe, ef_search=settings.ef_search)
                    Dp, Ip = drop_deleted(Dp, Ip, part, kk)
                    parts.append((Dp, np.where(Ip >= 0, Ip + part.row0, -1)))
                D, I = merge_topk(parts, kk)
            per_shard.append((s, D, I))
        # the one merge (index.merge): shards in order, each already in the tie order
        D, at = merge_order([np.where(I >= 0, D, -np.inf) for _, D, I in per_shard], k)
        rows = gather([I for _, _, I in per_shard], at)
        shard = gather([np.full(I.shape, s, dtype=np.int64) for s, _, I in per_shard], at)
        refs = np.stack([shard, rows], axis=2)
        valid = np.isfinite(D)
        return [D[q][valid[q]] for q in range(len(D))], [refs[q][valid[q]] for q in range(len(D))]

    def latent_top_items(self, latent: int, top_k: int) -> tuple[int, list[tuple[Any, float]]]:
        """Items with the largest value of ``latent`` and how many items have it active."""
        n_active, scores, items = 0, [], []
        for shard in self.shards:
            r, values = shard.posting(latent)
            n_active += len(r)
            d, at = merge_order([values[None, :]], top_k, keys=[r[None, :]])  # by value, then row
            keep = np.isfinite(d[0])
            scores.append(d[:, keep])
            items.append(shard.ids_at(r[at[0][keep]]))
        D, at = merge_order(scores, top_k)
        flat = [item for found in items for item in found]
        found = [(flat[int(a)], float(d)) for d, a in zip(D[0], at[0]) if np.isfinite(d)]
        return n_active, found

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

    def hit_codes(self, result: SearchResult, q: int, hits: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The stored codes (latent ids [n, k], unit values [n, k]) of hits ``hits`` (positions in query
        ``q``'s list) of a search of this gallery, read from their rows."""
        loc = result.locs[q][np.asarray(hits, dtype=np.int64)]
        idx = np.zeros((len(loc), self.manifest.k), dtype=np.int64)
        val = np.zeros((len(loc), self.manifest.k), dtype=np.float32)
        for s in np.unique(loc[:, 0]).tolist():
            sel = loc[:, 0] == s
            idx[sel], val[sel] = self.shards[s].codes(loc[sel, 2])
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
