"""CLIP image and text towers through open_clip, from a local checkpoint file or model directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ClipConfig
from ..extras import require
from .base import EncoderError, FeatureEncoder, autocast, weights_path

ENV_WEIGHTS = "SPARC_CLIP_WEIGHTS"
_EXPECTED = (
    "--clip-weights PATH: an open_clip checkpoint file (.safetensors, .bin or .pt) for --clip-model, "
    "or a directory holding open_clip_config.json and its weights (e.g. a downloaded hub snapshot)"
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
BPE_CACHE_MAX = 50_000  # distinct words the tokenizer remembers; beyond that its cache starts over


def budget_text(text: str, context_length: int) -> str:
    """``text`` cut to what can reach the model, before any tokenizer work.

    Every whitespace-separated word is at least one token, so words past the context length never reach
    the model; a word is cut at twice the context length in characters and the text at eight times (no
    caption that fits the context is touched, and the tokenizer's BPE, quadratic in a word's length,
    never sees a 4,000-letter word).
    """
    if len(text) <= 2 * context_length:
        return text
    kept, chars = [], 0
    for word in text.split():
        if len(kept) >= context_length or chars >= 8 * context_length:
            break
        word = word[: min(2 * context_length, 8 * context_length - chars)]
        kept.append(word)
        chars += len(word) + 1
    return " ".join(kept)


def _model_dir(path: Path) -> Path:
    """The directory with open_clip_config.json: ``path`` itself, or the one snapshot of a hub cache folder."""
    if (path / "open_clip_config.json").is_file():
        return path
    snapshots = sorted(p.parent for p in path.glob("snapshots/*/open_clip_config.json"))
    if len(snapshots) == 1:
        return snapshots[0]
    if len(snapshots) > 1:
        raise EncoderError(f"{path}: {len(snapshots)} snapshots found; point --clip-weights at one of {snapshots}")
    raise EncoderError(f"{path}: no open_clip_config.json in this directory (expected {_EXPECTED})")


class OpenClip:
    """A loaded open_clip model with its eval transform and tokenizer, shared by its two tower encoders."""

    def __init__(self, cfg: ClipConfig, device: torch.device, dtype: torch.dtype | None) -> None:
        open_clip = require("open_clip", "encoders", "CLIP encoders")

        path = weights_path(cfg.weights, ENV_WEIGHTS, "CLIP", _EXPECTED)
        self.weights = path
        if path.is_dir():
            model_dir = _model_dir(path)
            if not any(p.suffix in _WEIGHT_SUFFIXES for p in model_dir.iterdir()):
                raise EncoderError(f"{model_dir}: open_clip_config.json found but no weights file next to it")
            self.name = json.loads((model_dir / "open_clip_config.json").read_text()).get("model_name", model_dir.name)
            model_name, pretrained = f"local-dir:{model_dir}", None
        else:
            model_name, pretrained = self._registered_name(cfg.model), str(path)
            self.name = model_name
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, weights_only=True
            )
            self.tokenizer = open_clip.get_tokenizer(model_name)
            self.context_length = int(getattr(self.tokenizer, "context_length", None) or 77)
            cache = getattr(self.tokenizer, "cache", None)
            self._base_cache = dict(cache) if isinstance(cache, dict) else None
        except Exception as e:  # corrupt file, wrong architecture: open_clip raises many kinds
            raise EncoderError(f"{path}: cannot load as open_clip model {self.name!r} ({type(e).__name__}: {e})") from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.device, self.dtype = device, dtype
        with autocast(device, dtype):
            self.dim = int(self.model.encode_text(self.tokenize([""]).to(device)).shape[-1])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [n, context]: each text cut to its token budget first (``budget_text``); the BPE cache
        is bounded (``BPE_CACHE_MAX`` words), so a stream of distinct random words cannot grow memory."""
        cache = getattr(self.tokenizer, "cache", None)
        if self._base_cache is not None and isinstance(cache, dict) and len(cache) > BPE_CACHE_MAX:
            cache.clear()
            cache.update(self._base_cache)
        return self.tokenizer([budget_text(t, self.context_length) for t in texts])

    @staticmethod
    def _registered_name(model: str) -> str:
        """An open_clip model name; a model-config .json is registered under its file stem first."""
        import open_clip

        if model.endswith(".json"):
            cfg_path = Path(model).expanduser()
            if not cfg_path.is_file():
                raise EncoderError(f"open_clip model config not found: {cfg_path}")
            open_clip.add_model_config(cfg_path)
            return cfg_path.stem
        if model.startswith("hf-hub:"):
            raise EncoderError(f"{model}: hub names are not fetched; download the snapshot and pass its directory")
        if model.replace("/", "-") not in open_clip.list_models():
            raise EncoderError(f"unknown open_clip model {model!r}; see open_clip.list_models() or pass a model-config .json")
        return model

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features."""
        with autocast(self.device, self.dtype):
            out = self.model.encode_image(pixels.to(self.device, non_blocking=True), normalize=True)
        return out.float().cpu()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text features."""
        if not texts:
            return torch.empty(0, self.dim)
        tokens = self.tokenize(list(texts)).to(self.device, non_blocking=True)
        with autocast(self.device, self.dtype):
            out = self.model.encode_text(tokens, normalize=True)
        return out.float().cpu()


class ClipImageEncoder(FeatureEncoder):
    """The CLIP image tower as a stream encoder."""

    modality = "image"

    def __init__(self, clip: OpenClip, stream: str) -> None:
        self.clip, self.stream, self.name, self.dim, self.device = clip, stream, clip.name, clip.dim, clip.device
        self.preprocess, self.weights = clip.preprocess, clip.weights

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_pixels(pixels)


class ClipTextEncoder(FeatureEncoder):
    """The CLIP text tower as a stream encoder."""

    modality = "text"

    def __init__(self, clip: OpenClip, stream: str) -> None:
        self.clip, self.stream, self.name, self.dim, self.device = clip, stream, clip.name, clip.dim, clip.device
        self.weights = clip.weights

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_texts(texts)
