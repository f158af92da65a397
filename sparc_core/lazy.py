"""Package names imported on first use (PEP 562), so importing a package (``sparc --help``) loads no torch;
and the old paths of modules that moved."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable
from importlib import import_module
from types import ModuleType
from typing import Any


def lazy_exports(package: str, where: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: name -> the submodule (relative) that defines it; a name
    is imported when first asked for and then kept in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(import_module(f".{where[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*namespace, *where])

    return __getattr__, __dir__


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Old module paths of modules that moved: ``import old`` gives the module at its new path (the same
    object, so a patch through either name reaches it), with a DeprecationWarning naming the new path."""

    def __init__(self, moved: dict[str, str]) -> None:
        self.moved = moved

    def _new(self, name: str) -> str | None:
        """The new path of ``name``: a moved module, or a module inside a moved package."""
        for old, new in self.moved.items():
            if name == old or name.startswith(old + "."):
                return new + name[len(old) :]
        return None

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if self._new(name) else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = self._new(spec.name)
        assert new is not None
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported at its new path."""


def moved_modules(moved: dict[str, str]) -> None:
    """Keep old module paths importable (``{old dotted path: new dotted path}``): installed once per process."""
    if not any(isinstance(f, _Moved) and f.moved == moved for f in sys.meta_path):
        sys.meta_path.insert(0, _Moved(moved))  # before the path finder: a moved package's own modules too
