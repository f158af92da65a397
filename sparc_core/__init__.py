"""sparc_core: train, checkpoint and evaluate SPARC, a sparse latent space shared by several streams.

The names below are imported on first use (PEP 562), so ``sparc --help`` and light commands never pay for
torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "CheckpointError": "checkpoint",
    "checkpoint_hash": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ConfigError": "config",
    "SparcConfig": "config",
    "SparcError": "config",
    "SynthConfig": "config",
    "TrainConfig": "config",
    "FeatureError": "data",
    "PairedFeatures": "data",
    "evaluate": "metrics",
    "SparcModel": "model",
    "SparseCode": "model",
    "train": "train",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .checkpoint import CheckpointError, checkpoint_hash, load_checkpoint, save_checkpoint  # noqa: F401
    from .config import ConfigError, SparcConfig, SparcError, SynthConfig, TrainConfig  # noqa: F401
    from .data import FeatureError, PairedFeatures  # noqa: F401
    from .metrics import evaluate  # noqa: F401
    from .model import SparcModel, SparseCode  # noqa: F401
    from .train import train  # noqa: F401
