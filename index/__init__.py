"""index: index bundles over SPARC's shared sparse code, searched by sparse postings or FAISS.

The names below are imported on first use (PEP 562): loading the ``sparc index`` command does not load
numba or FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparc_core.lazy import lazy_exports

_WHERE = {
    "Bundle": "reader",
    "BundleError": "errors",
    "GalleryUnavailable": "errors",
    "SearchStopped": "errors",
    "Manifest": "manifest",
    "read_manifest": "manifest",
    "append_to_bundle": "bundle",
    "build_bundle": "bundle",
    "compact_bundle": "bundle",
    "delete_items": "bundle",
    "DenseIndexError": "faiss_backend",
    "Gallery": "gallery",
    "GalleryInfo": "gallery",
    "open_gallery": "opener",
    "ApproxParams": "params",
    "DEFAULT_PATH": "params",
    "DenseParams": "params",
    "ExactParams": "params",
    "SearchParams": "params",
    "SearchPath": "params",
    "SeismicParams": "params",
    "Explanation": "queries",
    "SearchResult": "queries",
    "merge_galleries": "queries",
    "merge_results": "queries",
    "Searcher": "searcher",
}
__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .bundle import append_to_bundle, build_bundle, compact_bundle, delete_items  # noqa: F401
    from .errors import BundleError, GalleryUnavailable, SearchStopped  # noqa: F401
    from .faiss_backend import DenseIndexError  # noqa: F401
    from .gallery import Gallery, GalleryInfo  # noqa: F401
    from .manifest import Manifest, read_manifest  # noqa: F401
    from .opener import open_gallery  # noqa: F401
    from .params import DEFAULT_PATH, ApproxParams, DenseParams, ExactParams, SearchParams, SearchPath, SeismicParams  # noqa: F401
    from .queries import Explanation, SearchResult, merge_galleries, merge_results  # noqa: F401
    from .reader import Bundle  # noqa: F401
    from .searcher import Searcher  # noqa: F401
