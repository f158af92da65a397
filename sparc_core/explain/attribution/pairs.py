"""An image and its caption: the latents both agree on, each with its heatmap and its word scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ...encoders import ClipTextEncoder, FeatureEncoder
from ...model import SparcModel
from .heatmaps import localize
from .hooks import _vision
from .targets import CLIP_METHODS, METHOD_ALIASES, AttributionError, Heatmap, latent_target
from .text import WordScores, attribute_text

MAX_PAIR_LATENTS = 8  # shared latents explained per pair at most (each costs one image and one text backward)


@dataclass
class SharedConcept:
    """A latent an image and a caption agree on, where it is in the image and which words drive it."""

    latent: int
    image_value: float  # its value in the image's agreed code
    text_value: float  # its value in the caption's agreed code
    heatmap: Heatmap
    words: WordScores


@dataclass
class PairExplanation:
    """Which regions and which words explain the latents an image and a caption share (the paper's Figure 5)."""

    caption: str
    stream: str
    concepts: list[SharedConcept]  # strongest shared latent first (product of the two values)
    image_only: list[int]  # agreed latents of the image the caption does not have
    text_only: list[int]  # and the reverse

    def to_json(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "stream": self.stream,
            "shared": [
                {
                    "latent": c.latent,
                    "name": c.heatmap.names.get(c.latent, ""),
                    "image_value": c.image_value,
                    "text_value": c.text_value,
                    "shape": list(c.heatmap.grid.shape),
                    "grid": [round(float(v), 6) for v in c.heatmap.grid.ravel()],
                    "words": [{"word": w, "score": round(x, 6)} for w, x in zip(c.words.words, c.words.scores)],
                }
                for c in self.concepts
            ],
            "image_only": self.image_only,
            "text_only": self.text_only,
        }


def explain_pair(
    model: SparcModel,
    image_encoder: FeatureEncoder,
    text_encoder: FeatureEncoder,
    image: Image.Image,
    caption: str,
    method: str = "relevance",
    text_method: str = "grad",
    max_latents: int = MAX_PAIR_LATENTS,
    names: dict[int, str] | None = None,
) -> PairExplanation:
    """For an image and a caption, the latents both agree on and, per latent, its heatmap on the image and
    the caption's word scores (see ``localize`` and ``attribute_text``)."""
    if method in CLIP_METHODS or METHOD_ALIASES.get(method) in CLIP_METHODS:
        raise AttributionError(f"{method} does not look for latents: explain a pair with relevance, gradcam or grad-x-input")
    if not 1 <= max_latents <= MAX_PAIR_LATENTS:
        raise AttributionError(f"max_latents must be in [1, {MAX_PAIR_LATENTS}], got {max_latents}")
    if not caption.strip():
        raise AttributionError("empty caption")
    _vision(image_encoder)
    if not isinstance(text_encoder, ClipTextEncoder):
        raise AttributionError(f"a pair needs the CLIP text tower (stream {text_encoder.stream!r} is not one)")
    image = image.convert("RGB")
    with torch.no_grad():
        img = model.encode({image_encoder.stream: image_encoder.encode_images([image]).to(model.device)}, code="agreed")
        txt = model.encode({text_encoder.stream: text_encoder.encode_texts([caption]).to(model.device)}, code="agreed")
    on_img = {int(i): float(v) for i, v in zip(img.indices[0].tolist(), img.values[0].tolist()) if v > 0}
    on_txt = {int(i): float(v) for i, v in zip(txt.indices[0].tolist(), txt.values[0].tolist()) if v > 0}
    shared = sorted(set(on_img) & set(on_txt), key=lambda i: -on_img[i] * on_txt[i])
    concepts = []
    for lat in shared[:max_latents]:
        target = latent_target(model, [lat])
        hm = localize(model, image_encoder, image, target, method=method, names=names)
        ws = attribute_text(model, text_encoder, caption, target, method=text_method)
        concepts.append(SharedConcept(lat, on_img[lat], on_txt[lat], hm, ws))
    return PairExplanation(
        caption=caption,
        stream=image_encoder.stream,
        concepts=concepts,
        image_only=sorted(set(on_img) - set(on_txt), key=lambda i: -on_img[i]),
        text_only=sorted(set(on_txt) - set(on_img), key=lambda i: -on_txt[i]),
    )
