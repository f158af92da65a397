"""The contract every gallery keeps: local bundles (``index.searcher.Searcher``) and a Milvus collection
(``index.milvus_backend.MilvusSearcher``); ``index.opener.open_gallery`` picks one by location."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sparc_core import SparcModel, SparseCode

from .manifest import Manifest
from .params import PATHS, SearchParams, SearchPath
from .queries import Explanation, SearchResult, explain_code, explain_codes


@dataclass(frozen=True)
class GalleryInfo:
    """What a gallery holds and which paths it answers."""

    stream: str
    n_items: int
    shards: int
    manifest: Manifest
    dense: bool  # the dense path (FAISS, or the collection's dense vectors)
    seismic: bool  # the seismic path (every shard has a Seismic index)
    backend: str = "bundle"  # "bundle" (local directories) or "milvus" (a collection)
    version: str = ""  # the live version directories of the bundles (v-..., comma-separated over shards)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in PATHS if (p != SearchPath.DENSE or self.dense) and (p != SearchPath.SEISMIC or self.seismic))


@runtime_checkable
class Gallery(Protocol):
    """Search, explain and browse one gallery of items encoded by one stream."""

    model: SparcModel
    stream: str
    manifest: Manifest

    @property
    def n_items(self) -> int: ...

    def info(self) -> GalleryInfo: ...

    def search(
        self,
        query: SparseCode | tuple[str, np.ndarray],
        params: SearchParams | None = None,
        should_stop: Callable[[], bool] | None = None,
        **options: Any,
    ) -> SearchResult:
        """Top hits of every query (a SparseCode, or (stream, raw vectors) to encode first), as ``params``
        says (or the keywords of ``SearchParams.create``); ``should_stop`` polled between chunks of work
        (raises SearchStopped once true)."""
        ...

    def item_code(self, item_id: Any) -> tuple[np.ndarray, np.ndarray]:
        """An item's stored code (latent ids, unit values), looked up by id."""
        ...

    def hit_codes(self, result: SearchResult, q: int, hits: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The stored codes (latent ids [n, w], unit values [n, w]) of hits ``hits`` (positions in query
        ``q``'s list) of this gallery's ``result``, from where the hits say they are stored (no id lookup)."""
        ...

    def explain(
        self, query: SparseCode, item_id: Any, top: int = 5, row: int = 0, boost: dict[int, float] | None = None
    ) -> list[Explanation]: ...

    def explain_hits(
        self, query: SparseCode, result: SearchResult, q: int, hits: Sequence[int], top: int = 5, row: int = 0,
        boost: dict[int, float] | None = None,
    ) -> list[list[Explanation]]:  # fmt: skip
        """``explain`` of several hits of ``result`` at once, from ``hit_codes``."""
        ...

    def latent_top_items(self, latent: int, top_k: int) -> tuple[int, list[tuple[Any, float]]]: ...


class ExplainsFromCodes:
    """``explain`` and ``explain_hits`` of the Gallery contract, for a gallery that gives ``item_code`` (by id)
    and ``hit_codes`` (from where a search's hits are stored)."""

    def item_code(self, item_id: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def hit_codes(self, result: SearchResult, q: int, hits: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def explain(
        self, query: SparseCode, item_id: Any, top: int = 5, row: int = 0, boost: dict[int, float] | None = None
    ) -> list[Explanation]:
        """The shared latents that contribute most to the sparse score of ``item_id`` for query ``row`` (with
        the search's ``boost``, so they add up to the boosted score)."""
        return explain_code(query, self.item_code(item_id), top, row, boost)

    def explain_hits(
        self, query: SparseCode, result: SearchResult, q: int, hits: Sequence[int], top: int = 5, row: int = 0,
        boost: dict[int, float] | None = None,
    ) -> list[list[Explanation]]:  # fmt: skip
        """``explain`` of hits ``hits`` (positions in query ``q``'s list of ``result``), from ``hit_codes``."""
        return explain_codes(query, self.hit_codes(result, q, hits), top, row, boost)
