"""index: index bundles over SPARC's shared sparse code, searched by sparse postings or FAISS.

The names below are imported on first use (PEP 562): loading the ``sparc index`` command does not load
numba or FAISS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparc_core.lazy import lazy_exports

_WHERE = {
    "Bundle": "bundle",
    "BundleError": "bundle",
    "Manifest": "bundle",
    "append_to_bundle": "bundle",
    "build_bundle": "bundle",
    "read_manifest": "bundle",
    "DenseIndexError": "faiss_backend",
    "SearchStopped": "postings",
    "DEFAULT_PATH": "searcher",
    "Explanation": "searcher",
    "SearchResult": "searcher",
    "Searcher": "searcher",
    "open_gallery": "searcher",
}
__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .bundle import Bundle, BundleError, Manifest, append_to_bundle, build_bundle, read_manifest  # noqa: F401
    from .faiss_backend import DenseIndexError  # noqa: F401
    from .postings import SearchStopped  # noqa: F401
    from .searcher import DEFAULT_PATH, Explanation, Searcher, SearchResult, open_gallery  # noqa: F401
