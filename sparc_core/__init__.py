"""sparc_core: train, checkpoint and evaluate SPARC, a sparse latent space shared by several streams."""

from .checkpoint import CheckpointError, checkpoint_hash, load_checkpoint, save_checkpoint
from .config import ConfigError, SparcConfig, SparcError, SynthConfig, TrainConfig
from .data import FeatureError, PairedFeatures
from .metrics import evaluate
from .model import SparcModel, SparseCode
from .train import train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FeatureError",
    "PairedFeatures",
    "SparcConfig",
    "SparcError",
    "SparcModel",
    "SparseCode",
    "SynthConfig",
    "TrainConfig",
    "checkpoint_hash",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
__version__ = "0.1.0"
