"""Explanation: what the shared latents mean and where they are.

- ``attribution``: heatmaps of a caption's (or named) latents on an image seen by a vision-only model, per-word
  attribution in captions, image-caption pair explanations;
- ``naming``: a name for each latent from a vocabulary encoded by a text stream (``latent_names.json``);
- ``concept_report``: the concept pages (firing rates, top items, pictures) of a set of stored codes.

The names below are imported on first use (PEP 562): importing the package loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_WHERE = {
    "AttributionError": "attribution",
    "Heatmap": "attribution",
    "attribute_text": "attribution",
    "explain_pair": "attribution",
    "localize": "attribution",
    "CodeSet": "concept_report",
    "write_concept_report": "concept_report",
    "NamingError": "naming",
    "load_latent_names": "naming",
    "name_latents": "naming",
    "write_latent_names": "naming",
}
__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .attribution import AttributionError, Heatmap, attribute_text, explain_pair, localize  # noqa: F401
    from .concept_report import CodeSet, write_concept_report  # noqa: F401
    from .naming import NamingError, load_latent_names, name_latents, write_latent_names  # noqa: F401
