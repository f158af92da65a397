"""Localize, AttributeText and ExplainPair: the engine's calls that run on the gradient lane (mixed into
``service.engine.Engine``; images are decoded through ``Engine._decode``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InvalidArgument

MAX_TARGET_LATENTS = 64  # latents one Localize / AttributeText call may name


class ConceptCalls:
    """See the concepts: heatmaps, word scores and pair explanations (validated here, run on the lane). The
    engine gives what they use: its settings, model, encoders, default streams, latent names, gradient lane,
    ``_encoder_for`` and ``_decode``."""

    settings: Any
    model: Any
    encoders: dict[str, Any]
    default_stream: dict[str, str | None]
    names: dict[int, str]
    lane: Any

    def _check_target(self, text: str, latents: list[int], weights: list[float]) -> None:
        """Validate a Localize / AttributeText target before it is queued on the gradient lane."""
        if bool(text) == bool(latents):
            raise InvalidArgument("give exactly one of text or latents")
        if latents:
            if len(latents) > MAX_TARGET_LATENTS:
                raise InvalidArgument(f"at most {MAX_TARGET_LATENTS} latents, got {len(latents)}")
            for lat in latents:
                if not 0 <= lat < self.model.n_latents:
                    raise InvalidArgument(f"latent {lat} is out of range [0, {self.model.n_latents})")
            if weights and (len(weights) != len(latents) or not all(np.isfinite(w) and w >= 0 for w in weights)):
                raise InvalidArgument("weights: one finite, non-negative weight per latent")
            return
        if len(text) > self.settings.max_text_chars:
            raise InvalidArgument(f"text of {len(text)} characters exceeds {self.settings.max_text_chars}")
        if not text.strip():
            raise InvalidArgument("empty text")
        self._encoder_for("text", "")

    def _target(
        self, text: str, latents: list[int], weights: list[float], top: int, model: Any = None, encoders: dict | None = None
    ) -> Any:
        from sparc_core.explain.attribution import latent_target, text_target

        model = model if model is not None else self.model
        encoders = encoders if encoders is not None else self.encoders
        self._check_target(text, latents, weights)
        if latents:
            return latent_target(model, latents, weights or None)
        return text_target(model, encoders[self._encoder_for("text", "").stream], text, top=top or None)

    def localize(
        self,
        image: bytes,
        text: str,
        latents: list[int],
        weights: list[float],
        encoder_stream: str,
        method: str,
        top: int,
        concepts: list[str] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any:
        """A heatmap (sparc_core.explain.attribution.Heatmap) of a caption's or latents' concepts on an image."""
        from sparc_core.explain.attribution import CLIP_METHODS, METHOD_ALIASES, METHODS, localize

        method = METHOD_ALIASES.get(method, method) or "relevance"
        if method not in METHODS:
            raise InvalidArgument(f"unknown method {method!r}; methods: {list(METHODS)}")
        if not image:
            raise InvalidArgument("empty image")
        if len(image) > self.settings.max_image_bytes:
            raise InvalidArgument(f"image of {len(image)} bytes exceeds {self.settings.max_image_bytes}")
        enc = self._encoder_for("image", encoder_stream)
        text_enc = self.encoders.get(self.default_stream["text"] or "")
        if method in CLIP_METHODS and not text:
            raise InvalidArgument(f"{method} compares CLIP's image with a caption: give text")
        if concepts:
            if text or latents:
                raise InvalidArgument("give text, latents or concepts, not several")
            from sparc_core.explain.naming import NamingError, latents_named

            try:
                latents = sorted({i for c in concepts for i in latents_named(self.names, c)})
            except NamingError as e:
                raise InvalidArgument(str(e)) from None
        self._check_target(text, latents, weights)
        self.lane.check_room()  # before the image is decoded
        pil = self._decode(image)

        def work(model, encoders):
            target = self._target(text, latents, weights, top, model, encoders)
            te = encoders.get(text_enc.stream) if text_enc is not None else None
            return localize(model, encoders[enc.stream], pil, target, method=method, text_encoder=te, names=self.names)

        return self.lane.run(work, should_stop)

    def explain_pair(
        self,
        image: bytes,
        text: str,
        encoder_stream: str,
        method: str,
        max_latents: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> Any:
        """The latents an image and its caption share, each with its heatmap and word scores
        (sparc_core.explain.attribution.PairExplanation)."""
        from sparc_core.explain.attribution import CLIP_METHODS, MAX_PAIR_LATENTS, METHOD_ALIASES, METHODS, explain_pair

        method = METHOD_ALIASES.get(method, method) or "relevance"
        if method not in METHODS or method in CLIP_METHODS:
            allowed = [m for m in METHODS if m not in CLIP_METHODS]
            raise InvalidArgument(f"unknown pair method {method!r}; methods: {allowed}")
        if max_latents > MAX_PAIR_LATENTS:
            raise InvalidArgument(f"max_latents is at most {MAX_PAIR_LATENTS}, got {max_latents}")
        if not text.strip():
            raise InvalidArgument("empty text")
        if len(text) > self.settings.max_text_chars:
            raise InvalidArgument(f"text of {len(text)} characters exceeds {self.settings.max_text_chars}")
        if not image:
            raise InvalidArgument("empty image")
        if len(image) > self.settings.max_image_bytes:
            raise InvalidArgument(f"image of {len(image)} bytes exceeds {self.settings.max_image_bytes}")
        image_enc, text_enc = self._encoder_for("image", encoder_stream), self._encoder_for("text", "")
        self.lane.check_room()  # before the image is decoded
        pil = self._decode(image)

        def work(model, encoders):
            ie, te = encoders[image_enc.stream], encoders[text_enc.stream]
            return explain_pair(model, ie, te, pil, text, method, max_latents=max_latents or MAX_PAIR_LATENTS, names=self.names)

        return self.lane.run(work, should_stop)

    def attribute(self, text: str, latents: list[int], method: str, should_stop: Callable[[], bool] | None = None) -> Any:
        """Per-word scores (sparc_core.explain.attribution.WordScores) of a caption."""
        from sparc_core.explain.attribution import TEXT_METHODS, attribute_text

        method = method or "grad"
        if method not in TEXT_METHODS:
            raise InvalidArgument(f"unknown method {method!r}; methods: {list(TEXT_METHODS)}")
        if not text.strip():
            raise InvalidArgument("empty text")
        if len(text) > self.settings.max_text_chars:
            raise InvalidArgument(f"text of {len(text)} characters exceeds {self.settings.max_text_chars}")
        enc = self._encoder_for("text", "")

        if latents:
            self._check_target("", latents, [])

        def work(model, encoders):
            target = self._target("", latents, [], 0, model, encoders) if latents else None
            return attribute_text(model, encoders[enc.stream], text, target, method=method)

        return self.lane.run(work, should_stop)
