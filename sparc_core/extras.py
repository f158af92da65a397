"""Optional dependencies, installed by job (pyproject extras): a missing one is a clear error naming the
extra that brings it, raised only by the feature that needs it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .config import SparcError


class MissingExtra(SparcError, ImportError):
    """A feature whose optional dependency is not installed; the message says what to install."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, what: str) -> ModuleType:
    """``module``, imported; MissingExtra ("pip install 'sparc[extra]'") when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} need {module}, which is not installed: pip install 'sparc[{extra}]'") from None
