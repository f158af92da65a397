"""The one interface every feature encoder has, and what they share: devices, precision, weight files."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from ..config import SparcError

Modality = Literal["image", "text"]


class EncoderError(SparcError, ValueError):
    """An encoder that cannot be built or used (missing weights, wrong layout, wrong modality)."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    "auto" is bf16 (or fp16) on CUDA and fp32 on CPU; bf16 may be asked for on CPU too (faster where the
    CPU has bf16 instructions, slightly less exact).
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        if precision == "fp16":
            raise EncoderError("fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Inference mode, plus mixed precision when ``dtype`` is set."""
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def weights_path(given: str | None, env_var: str, what: str, expected: str) -> Path:
    """The local weights the user pointed at (argument, then ``env_var``); never a download."""
    raw = given or os.environ.get(env_var)
    if not raw:
        raise EncoderError(
            f"no {what} weights configured: pass {expected}, or set {env_var}. "
            "Weights are only read from local files; nothing is downloaded."
        )
    path = Path(raw).expanduser()
    if not path.exists():
        raise EncoderError(f"{what} weights not found: {path} does not exist (expected {expected})")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with ``weights_only=True`` (no unpickling)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file, or one that needs code execution to load
        raise EncoderError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"{path}: not a state dict of tensors")
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


class FeatureEncoder:
    """One stream's encoder: images or texts in, a [n, dim] float32 feature matrix (on CPU) out."""

    name: str  # model name, for manifests and logs
    stream: str  # the stream label its features feed
    dim: int  # output feature dim
    modality: Modality
    device: torch.device
    weights: Path | None = None  # the weights file or directory it was loaded from
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None  # PIL image -> pixel tensor (image encoders)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a preprocessed [n, 3, H, W] batch (image encoders)."""
        raise EncoderError(f"stream {self.stream!r} ({self.name}) encodes {self.modality}s, not images")

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Features of PIL images."""
        if self.preprocess is None:
            raise EncoderError(f"stream {self.stream!r} ({self.name}) encodes {self.modality}s, not images")
        if not images:
            return torch.empty(0, self.dim)
        return self.encode_pixels(torch.stack([self.preprocess(im.convert("RGB")) for im in images]))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Features of texts (text encoders)."""
        raise EncoderError(f"stream {self.stream!r} ({self.name}) encodes {self.modality}s, not texts")
