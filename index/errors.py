"""The errors index raises: a caller maps them (the service to status codes, the CLI to one line)."""

from __future__ import annotations

from sparc_core import SparcError


class BundleError(SparcError, RuntimeError):
    """A bundle that cannot be built or loaded (or a gallery asked for what it lacks); the message names the
    file and the problem."""


class GalleryUnavailable(BundleError):
    """The store behind a gallery (a Milvus server) cannot be reached or did not answer in time."""


class SearchStopped(RuntimeError):
    """A search stopped early because its caller asked (deadline passed, call cancelled)."""
