"""What a map or a word score explains: a target (latents and weights, from a caption's code or given by hand),
the methods offered, and the heatmap a method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...config import SparcError
from ...encoders import FeatureEncoder
from ...model import SparcModel

METHODS = ("relevance", "gradcam", "grad-x-input", "clip-relevance", "clip-cosine")
CLIP_METHODS = ("clip-relevance", "clip-cosine")  # CLIP's own image-text baselines: the CLIP image tower and a caption
METHOD_ALIASES = {"clip-sim": "clip-cosine"}  # the earlier name of clip-cosine
HEATMAP_PNG_SIZE = (560, 480)  # width, height in pixels of save_heatmap_png's picture
TEXT_METHODS = ("grad", "relevance")
SCORES = ("activation", "joint")  # what a heatmap explains: the target's activations, or its code's similarity


class AttributionError(SparcError, ValueError):
    """A localisation or attribution request that cannot be served; the message says why."""


@dataclass
class Target:
    """Latents and their weights (what a heatmap looks for)."""

    latents: list[int]
    weights: list[float]
    source: str = "latents"  # "latents", or the caption the code came from

    def tensor(self, n_latents: int, device: torch.device) -> torch.Tensor:
        w = torch.zeros(n_latents, device=device)
        w[torch.tensor(self.latents, device=device, dtype=torch.long)] = torch.tensor(self.weights, device=device)
        return w


@dataclass
class Heatmap:
    """A [h, w] patch-grid map, the same map upsampled to the input crop, and what it was made from."""

    grid: np.ndarray  # [h, w] in [0, 1]
    upsampled: np.ndarray  # [H, W] in [0, 1]
    method: str
    stream: str
    target: Target
    image: np.ndarray  # [H, W, 3] uint8: the crop the encoder saw
    activations: dict[int, float] = field(default_factory=dict)  # target latent -> its value in the image's code
    names: dict[int, str] = field(default_factory=dict)
    target_fires: bool = True  # False: none of the target's latents fires on the image, the map is flat

    @property
    def note(self) -> str:
        """A sentence for the user when the map says nothing ("" otherwise)."""
        if self.target_fires:
            return ""
        return "none of the target's latents fires on this image (all their activations are 0): the map is empty"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "stream": self.stream,
            "shape": list(self.grid.shape),
            "grid": [round(float(v), 6) for v in self.grid.ravel()],
            "latents": [
                {"latent": i, "weight": w, "image_activation": self.activations.get(i, 0.0), "name": self.names.get(i, "")}
                for i, w in zip(self.target.latents, self.target.weights)
            ],
            "target_source": self.target.source,
            "target_fires": self.target_fires,
            "note": self.note,
        }


def text_target(
    model: SparcModel, text_encoder: FeatureEncoder, text: str, top: int | None = None, code: str = "agreed"
) -> Target:
    """The sparse code of a caption (CLIP text tower -> shared code) as a target, strongest latents first.
    ``code``: which of the model's codes ("agreed", the default: the concepts the streams agree on;
    "search"; "full")."""
    if text_encoder.modality != "text":
        raise AttributionError(f"stream {text_encoder.stream!r} does not encode text")
    if not text.strip():
        raise AttributionError("empty caption")
    feats = text_encoder.encode_texts([text]).to(model.device)
    sparse = model.encode({text_encoder.stream: feats}, code=code)  # type: ignore[arg-type]
    vals, idx = sparse.values[0].cpu(), sparse.indices[0].cpu()
    order = torch.argsort(vals, descending=True)
    keep = [int(j) for j in order if vals[j] > 0][: top or None]
    if not keep:
        raise AttributionError(f"the caption {text!r} activates no latent")
    total = float(vals[keep].sum())
    return Target([int(idx[j]) for j in keep], [float(vals[j]) / total for j in keep], source=text)


def latent_target(model: SparcModel, latents: list[int], weights: list[float] | None = None) -> Target:
    if not latents:
        raise AttributionError("no latents given")
    for i in latents:
        if not 0 <= i < model.n_latents:
            raise AttributionError(f"latent {i} is out of range [0, {model.n_latents})")
    w = weights or [1.0 / len(latents)] * len(latents)
    if len(w) != len(latents):
        raise AttributionError("give one weight per latent")
    return Target(list(latents), [float(x) for x in w])
