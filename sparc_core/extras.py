"""Optional dependencies, installed by job (pyproject extras): a missing one is a clear error naming the
extra that brings it, raised only by the feature that needs it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from .config import SparcError


class MissingExtra(SparcError, ImportError):
    """A feature whose optional dependency is not installed; the message says what to install."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, extra: str, what: str, error: type[Exception] = MissingExtra, hint: str = "") -> ModuleType:
    """``module``, imported; ``error`` ("WHAT need MODULE, which is not installed: pip install 'sparc[EXTRA]'"
    and the ``hint``) when it is not installed. The one way an optional dependency is imported."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise error(f"{what} need {module}, which is not installed: pip install 'sparc[{extra}]'{hint}") from None


class LazyModule:
    """An optional module imported through :func:`require` on first attribute access (a module-level name
    that costs nothing until used)."""

    def __init__(self, module: str, extra: str, what: str, error: type[Exception] = MissingExtra, hint: str = "") -> None:
        self._args = (module, extra, what, error, hint)
        self._module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._module is None:
            self._module = require(*self._args)
        return getattr(self._module, name)
