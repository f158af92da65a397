"""index: index bundles over SPARC's shared sparse code, searched by sparse postings or FAISS."""

from .bundle import Bundle, BundleError, Manifest, append_to_bundle, build_bundle, read_manifest
from .faiss_backend import DenseIndexError
from .postings import SearchStopped
from .searcher import DEFAULT_PATH, Explanation, Searcher, SearchResult, open_gallery

__all__ = [
    "DEFAULT_PATH",
    "Bundle",
    "BundleError",
    "DenseIndexError",
    "Explanation",
    "Manifest",
    "SearchResult",
    "SearchStopped",
    "Searcher",
    "append_to_bundle",
    "build_bundle",
    "open_gallery",
    "read_manifest",
]
