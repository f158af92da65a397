"""sparc_core: train, checkpoint and evaluate SPARC, a sparse latent space shared by several streams.

The product (model, losses, kernels, train, calibrate, checkpoint, config, data, encoders, extract, metrics,
report, plots, cluster, cli, and atomic / extras / lazy under them) is this folder; ``explain/`` says what the
latents mean and where (attribution, naming, concept report); ``worlds/`` holds the data where the truth is
known and what is measured on it (planted concepts, rendered scenes, towers, alignment, demo).

The names below are imported on first use (PEP 562), so ``sparc --help`` and light commands never pay for
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports, moved_modules

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


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())

# modules that moved into explain/ and worlds/: their old paths still import (DeprecationWarning)
MOVED = {
    **{f"{__name__}.{m}": f"{__name__}.explain.{m}" for m in ("attribution", "concept_report", "naming")},
    **{
        f"{__name__}.{m}": f"{__name__}.worlds.{m}" for m in ("alignment", "demo", "scenes", "scenes_eval", "synthetic", "towers")
    },
}
moved_modules(MOVED)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .checkpoint import CheckpointError, checkpoint_hash, load_checkpoint, save_checkpoint  # noqa: F401
    from .config import ConfigError, SparcConfig, SparcError, SynthConfig, TrainConfig  # noqa: F401
    from .data import FeatureError, PairedFeatures  # noqa: F401
    from .metrics import evaluate  # noqa: F401
    from .model import SparcModel, SparseCode  # noqa: F401
    from .train import train  # noqa: F401
