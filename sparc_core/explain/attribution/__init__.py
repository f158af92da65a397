"""Concepts you can see: where a set of latents sits in an image, and which words of a caption drive them.

Because latent i means the same concept in every stream, a caption's code (CLIP text tower -> shared code)
names latents that can be looked for in an image seen by a vision-only model (DINOv2). A **target** is a
set of latents with weights: the caption's sparse code, or latent ids given by hand. Its score on an image
is ``sum_i w_i * relu(logit_i)``, the pre-selection activations of those latents in the image stream's
code (differentiable, and non-zero even for a latent the image's top-k did not keep).

Image heatmaps (``localize``), each a [h, w] map over the vision transformer's patch grid:

- ``relevance``: transformer relevance propagation through the attention maps (Chefer, Gur & Wolf 2021,
  "Generic attention-model explainability"): R = I; per block R += mean_heads(relu(dS/dA * A)) @ R; the
  map is the class token's row over the patches (the method family the SPARC authors use).
- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) as it is used on ViTs: the activations are the patch tokens
  at the last block's first norm (timm ``norm1``, open_clip ``ln_1``), each channel weighted by its gradient
  averaged over the patches, summed, ReLU.
- ``grad-x-input``: each patch token entering the last block times its own gradient, summed over channels
  (tokens centred, so a patch that looks like every other gets no credit), ReLU.
- ``clip-relevance``: the CLIP-similarity baseline of the paper: the same relevance propagation of CLIP's
  own image-text similarity (the caption's CLIP text embedding against the image embedding), no SAE at all.
  CLIP image tower only.
- ``clip-cosine``: cosine between each CLIP patch token (after ``ln_post`` and the projection) and the
  caption's CLIP text embedding. CLIP image tower only.

On a CLIP image tower of the ResNet layout (open_clip's ModifiedResNet, as OpenAI's RN50), the grid is
layer4's and the one attention is the attention pool's (the grid's mean token as the query, reading the
grid): ``relevance`` and ``clip-relevance`` are the same propagation through that one map (the mean token's
row), ``gradcam`` is Grad-CAM on layer4 (the classic form for ResNets), ``grad-x-input`` uses layer4's tokens,
and ``clip-cosine`` sends each grid token through the pool's value and output projections (as MaskCLIP does).

Every map is computed from the gradients of the input tokens and attention maps only (``torch.autograd.grad``):
no weight of the towers or of the SAE gets a ``.grad``. A target none of whose latents fires on the image
(all its activations are 0) has no gradient to follow: its map is flat, and ``Heatmap.target_fires`` says so.

Maps are min-max normalised to [0, 1] (the weakest patch 0, the strongest 1, a flat map all 0) and
upsampled bilinearly to the encoder's input crop (the centre crop the encoder sees; the overlay shows that
crop). Scores are relative within one map: compare where, not how much, across images.

Caption attribution (``attribute_text``): per-word relevance of a caption for a target, through the CLIP text
tower: gradient x input on the token embeddings, the caption's mean embedding (with the vocabulary's average
token as one more word) as the baseline (``grad``), or
attention relevance read at the end-of-text token (``relevance``). BPE tokens are merged back into the
caption's words (scores summed; digits and punctuation the tokenizer splits off rejoin their word).

The package, by job: ``targets`` (what a map explains, the methods offered), ``hooks`` (into the towers'
transformers), ``heatmaps`` (``localize``), ``text`` (``attribute_text``), ``pairs`` (``explain_pair``),
``drawing`` (PNG bytes; ``save_*`` write them).
"""

from __future__ import annotations

from .drawing import heatmap_png, pair_png, save_heatmap_png, save_pair_png, save_words_png, words_png
from .heatmaps import localize
from .pairs import MAX_PAIR_LATENTS, PairExplanation, SharedConcept, explain_pair
from .targets import (
    CLIP_METHODS,
    HEATMAP_PNG_SIZE,
    METHOD_ALIASES,
    METHODS,
    SCORES,
    TEXT_METHODS,
    AttributionError,
    Heatmap,
    Target,
    latent_target,
    text_target,
)
from .text import WordScores, attribute_text

__all__ = [
    "words_png",
    "pair_png",
    "heatmap_png",
    "METHODS",
    "CLIP_METHODS",
    "METHOD_ALIASES",
    "TEXT_METHODS",
    "SCORES",
    "HEATMAP_PNG_SIZE",
    "MAX_PAIR_LATENTS",
    "AttributionError",
    "Heatmap",
    "PairExplanation",
    "SharedConcept",
    "Target",
    "WordScores",
    "attribute_text",
    "explain_pair",
    "latent_target",
    "localize",
    "save_heatmap_png",
    "save_pair_png",
    "save_words_png",
    "text_target",
]
