"""Feature encoders for the streams: open_clip CLIP image/text towers and DINOv2, from local weights only.

Every encoder has one interface (:class:`FeatureEncoder`): ``encode_images`` / ``encode_texts``, a ``name``,
an output ``dim`` and the ``stream`` label its features feed. :func:`load_encoders` builds them from config.
"""

from __future__ import annotations

from ..checkpoint import pick_device
from ..config import EncodersConfig
from .base import EncoderError, FeatureEncoder, resolve_precision
from .clip import ClipImageEncoder, ClipTextEncoder, OpenClip
from .dino import DinoEncoder


def load_encoders(cfg: EncodersConfig) -> dict[str, FeatureEncoder]:
    """Every configured encoder, keyed by the stream it feeds (CLIP's two towers share one model)."""
    device = pick_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    out: dict[str, FeatureEncoder] = {}
    if cfg.clip is not None:
        if cfg.clip.image_stream and cfg.clip.image_stream == cfg.clip.text_stream:
            raise EncoderError(f"CLIP image and text towers both feed stream {cfg.clip.image_stream!r}")
        clip = OpenClip(cfg.clip, device, dtype)
        if cfg.clip.image_stream:
            out[cfg.clip.image_stream] = ClipImageEncoder(clip, cfg.clip.image_stream)
        if cfg.clip.text_stream:
            out[cfg.clip.text_stream] = ClipTextEncoder(clip, cfg.clip.text_stream)
    if cfg.dino is not None:
        if cfg.dino.stream in out:
            raise EncoderError(f"stream {cfg.dino.stream!r} is fed by two encoders")
        out[cfg.dino.stream] = DinoEncoder(cfg.dino, device, dtype)
    return out


__all__ = [
    "ClipImageEncoder",
    "ClipTextEncoder",
    "DinoEncoder",
    "EncoderError",
    "FeatureEncoder",
    "OpenClip",
    "load_encoders",
    "resolve_precision",
]
