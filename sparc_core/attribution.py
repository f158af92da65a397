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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import SparcError
from .encoders import ClipImageEncoder, ClipTextEncoder, DinoEncoder, FeatureEncoder
from .encoders.clip import budget_text
from .model import SparcModel

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


# ---- the vision transformers -------------------------------------------------------------------------------
class _Recorder:
    """Attention probabilities of every block, kept with their gradients."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def keep(self, a: torch.Tensor) -> torch.Tensor:
        self.maps.append(a)
        return a


@contextlib.contextmanager
def _timm_attention(vit: Any, rec: _Recorder) -> Iterator[None]:
    """timm ViT blocks compute attention explicitly (not fused) and hand their probabilities to ``rec``."""
    saved, handles = [], []
    for blk in vit.blocks:
        attn = blk.attn
        saved.append((attn, attn.fused_attn))
        attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o: rec.keep(o)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for attn, fused in saved:
            attn.fused_attn = fused


def _explicit_mha(mha: torch.nn.MultiheadAttention, q_x, k_x, v_x, attn_mask, rec: _Recorder) -> torch.Tensor:
    """nn.MultiheadAttention (batch first) computed step by step, so its probabilities carry gradients."""
    b, lq, d = q_x.shape
    h = mha.num_heads
    hd = d // h
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    q = F.linear(q_x, wq, bq).view(b, lq, h, hd).transpose(1, 2)
    k = F.linear(k_x, wk, bk).view(b, k_x.shape[1], h, hd).transpose(1, 2)
    v = F.linear(v_x, wv, bv).view(b, v_x.shape[1], h, hd).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) / hd**0.5
    if attn_mask is not None:
        mask = (
            attn_mask.to(scores.dtype)
            if attn_mask.dtype != torch.bool
            else torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
        )
        scores = scores + mask
    a = rec.keep(scores.softmax(-1))
    out = (a @ v).transpose(1, 2).reshape(b, lq, d)
    return mha.out_proj(out)


@contextlib.contextmanager
def _clip_attention(transformer: Any, rec: _Recorder) -> Iterator[None]:
    """open_clip residual blocks return their per-head attention weights to ``rec``."""
    patched = []
    for blk in transformer.resblocks:

        def attention(q_x, k_x=None, v_x=None, attn_mask=None, _blk=blk):
            return _explicit_mha(_blk.attn, q_x, q_x if k_x is None else k_x, q_x if v_x is None else v_x, attn_mask, rec)

        blk.attention = attention
        patched.append(blk)
    try:
        yield
    finally:
        for blk in patched:
            del blk.attention  # back to the class's method


@contextlib.contextmanager
def _last_tokens(block: torch.nn.Module, norm: torch.nn.Module, store: dict) -> Iterator[None]:
    """Keep the tokens entering the last block (the class token reads the patches through that block's
    attention, so the patch tokens after it no longer reach the output), its first norm's output (Grad-CAM's
    activations) and its output."""

    def pre(module, inputs):
        store["tokens"] = inputs[0]

    def normed(module, inputs, output):
        store["normed"] = output

    def post(module, inputs, output):
        store["out"] = output

    hs = [block.register_forward_pre_hook(pre), norm.register_forward_hook(normed), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def _input_grads(score: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d score / d each input (None where it does not depend on it); no parameter gets a ``.grad``."""
    wanted = [x for x in inputs if x.requires_grad]
    if not score.requires_grad or not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad(score, wanted, allow_unused=True))
    return [next(got) if x.requires_grad else None for x in inputs]


def _vision(encoder: FeatureEncoder) -> tuple[str, Any]:
    if isinstance(encoder, DinoEncoder):
        return "dino", encoder.model
    if isinstance(encoder, ClipImageEncoder):
        visual = encoder.clip.model.visual
        if not hasattr(visual, "transformer"):
            raise AttributionError(f"{encoder.name}: heatmaps need a vision transformer (this CLIP image tower is not one)")
        return "clip", visual
    raise AttributionError(f"stream {encoder.stream!r} ({encoder.name}) is not an image encoder")


def _grid(n_patches: int, pixels: torch.Tensor) -> tuple[int, int]:
    h, w = pixels.shape[-2:]
    for ph in range(1, n_patches + 1):
        if n_patches % ph == 0 and abs(ph / (n_patches // ph) - h / w) < 1e-6:
            return ph, n_patches // ph
    side = int(round(n_patches**0.5))
    return side, n_patches // side


def _unnormalise(pixels: torch.Tensor, encoder: FeatureEncoder) -> np.ndarray:
    """The [H, W, 3] uint8 crop the encoder saw (its preprocessing's normalisation undone)."""
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    for t in getattr(encoder.preprocess, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            mean, std = tuple(t.mean), tuple(t.std)
    x = pixels[0].detach().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _normalised(m: torch.Tensor) -> torch.Tensor:
    """(m - min) / (max - min): the weakest patch 0, the strongest 1; a flat map is all 0."""
    m = m - m.min()
    top = m.max()
    return m / top if top > 0 else m


def localize(
    model: SparcModel,
    encoder: FeatureEncoder,
    image: Image.Image,
    target: Target,
    method: str = "relevance",
    text_encoder: FeatureEncoder | None = None,
    names: dict[int, str] | None = None,
    start_layer: int = 0,
    score: str = "activation",
) -> Heatmap:
    """The heatmap of ``target``'s latents on ``image`` as ``encoder``'s stream sees it (see the module doc).

    ``start_layer``: the first block the relevance rollout takes in (0: every block; -1: the last only, as
    the SPARC authors' code starts). ``score``: what the map explains, "activation" (``sum_i w_i *
    relu(logit_i)``, every target latent counted even where the image's top-k drops it) or "joint" (the
    similarity of the target's code with the image's top-k code, ``sum_i w_i * z_i``, the authors' target).
    The CLIP methods never read the SAE: their maps and ``target_fires`` depend on the caption alone."""
    method = METHOD_ALIASES.get(method, method)
    if method not in METHODS:
        raise AttributionError(f"unknown method {method!r}; methods: {list(METHODS)}")
    if score not in SCORES:
        raise AttributionError(f"unknown score {score!r}; scores: {list(SCORES)}")
    if encoder.stream not in model.streams:
        raise AttributionError(f"the checkpoint has no stream {encoder.stream!r} (it has {model.streams})")
    kind, vit = _vision(encoder)
    if method in CLIP_METHODS:
        if kind != "clip":
            raise AttributionError(f"{method} compares CLIP's image with the caption: it needs the CLIP image tower")
        if text_encoder is None or target.source == "latents":
            raise AttributionError(f"{method} needs a caption (--text) and the CLIP text tower")
    # the pixels carry the gradient, so a tower whose weights are frozen (requires_grad False) still gives maps
    pixels = encoder.preprocess(image.convert("RGB"))[None].to(encoder.device).requires_grad_(True)
    for i in target.latents:
        if not 0 <= i < model.n_latents:
            raise AttributionError(f"latent {i} is out of range [0, {model.n_latents})")
    w = target.tensor(model.n_latents, model.device)
    rec, store = _Recorder(), {}
    with torch.enable_grad():
        if kind == "dino":
            prefix = vit.num_prefix_tokens
            last = vit.blocks[-1]
            with _timm_attention(vit, rec), _last_tokens(last, last.norm1, store):
                feats = vit.forward_features(pixels)[:, 0]
        else:
            prefix = 1
            last = vit.transformer.resblocks[-1]
            with _clip_attention(vit.transformer, rec), _last_tokens(last, last.ln_1, store):
                feats = encoder.clip.model.encode_image(pixels, normalize=True)
            if not getattr(vit.transformer, "batch_first", True):
                raise AttributionError("sequence-first open_clip transformers are not supported")
        tokens, normed = store["tokens"], store["normed"]  # [1, T, D] each
        feats = feats.float()
        logits = model.logits(encoder.stream, feats.to(model.device))
        if score == "joint":
            top = logits.topk(min(model.k, logits.shape[-1]), dim=-1)
            code = torch.zeros_like(logits).scatter(-1, top.indices, F.relu(top.values))
            target_score = (code * w).sum()
        else:
            target_score = (F.relu(logits) * w).sum()
        if method == "clip-relevance":
            with torch.no_grad():
                txt = F.normalize(text_encoder.encode_texts([target.source]).float().to(feats.device), dim=-1)
            explained = (F.normalize(feats, dim=-1) * txt).sum()  # CLIP's image-text similarity (its logit / temperature)
        else:
            explained = target_score
        grads = _input_grads(explained, [tokens, normed, *rec.maps]) if method != "clip-cosine" else [None] * (2 + len(rec.maps))
    fires = method in CLIP_METHODS or float(target_score.detach()) > 0
    with torch.no_grad():
        code = model.encode({encoder.stream: feats.detach().to(model.device)}, code="agreed")
        acts = dict(zip(code.indices[0].tolist(), code.values[0].tolist()))
    n_patches = tokens.shape[1] - prefix
    gh, gw = _grid(n_patches, pixels)
    zero = torch.zeros(n_patches)
    if method == "gradcam":
        g = grads[1]
        if g is None:
            m = zero
        else:
            a = normed[0, prefix:].detach().float()
            m = (a * g[0, prefix:].float().mean(0, keepdim=True)).sum(-1).clamp_min(0)
    elif method == "grad-x-input":
        g = grads[0]
        t = tokens[0, prefix:].detach().float()
        m = zero if g is None else ((t - t.mean(0, keepdim=True)) * g[0, prefix:].float()).sum(-1).clamp_min(0)
    elif method in ("relevance", "clip-relevance"):
        n = tokens.shape[1]
        r = torch.eye(n)
        first = start_layer % len(rec.maps) if rec.maps else 0
        for a, g in list(zip(rec.maps, grads[2:]))[first:]:
            if g is None:
                continue
            cam = (g[0].float() * a[0].detach().float()).clamp_min(0).mean(0).cpu()
            r = r + cam @ r
        m = r[0, prefix:]  # no gradient at all leaves R = I: a zero map
    else:  # clip-cosine
        with torch.no_grad():
            patch = vit.ln_post(store["out"][0, prefix:].detach())
            if vit.proj is not None:
                patch = patch @ vit.proj
            txt = text_encoder.encode_texts([target.source]).to(patch.device)
            m = F.cosine_similarity(patch.float(), txt.float(), dim=-1)
    grid = _normalised(m.detach().cpu().float().reshape(gh, gw))
    up = F.interpolate(grid[None, None], size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    return Heatmap(
        grid=grid.numpy(),
        upsampled=_normalised(up).numpy(),
        method=method,
        stream=encoder.stream,
        target=target,
        image=_unnormalise(pixels, encoder),
        activations={i: float(acts.get(i, 0.0)) for i in target.latents},
        names=names or {},
        target_fires=fires,
    )


# ---- captions ----------------------------------------------------------------------------------------------
@dataclass
class WordScores:
    words: list[str]
    scores: list[float]  # signed, divided by the largest magnitude
    method: str
    target: Target

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "words": [{"word": w, "score": round(s, 6)} for w, s in zip(self.words, self.scores)],
            "latents": [{"latent": i, "weight": w} for i, w in zip(self.target.latents, self.target.weights)],
        }


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each BPE token as text, ending in a space where a word ends."""
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    out = []
    for t in ids:
        if isinstance(decoder, dict) and byte_decoder is not None and t in decoder:
            s = decoder[t]
            s = bytearray(byte_decoder.get(c, ord("?")) for c in s).decode("utf-8", errors="replace")
            out.append(s.replace("</w>", " "))
        else:  # a Hugging Face tokenizer: one piece per token, word starts marked by a space or "Ġ"/"▁"
            s = tokenizer.tokenizer.decode([t]) if hasattr(tokenizer, "tokenizer") else str(t)
            out.append(s)
    return out


def _align_to_caption(text: str, pieces: list[str], scores: list[float]) -> tuple[list[str], list[float]] | None:
    """Pieces grouped by the caption's own (whitespace) words, when they spell them out; else None."""
    words, out = text.split(), []
    i = 0
    for w in words:
        target, acc, s = w.lower().replace(" ", ""), "", 0.0
        while i < len(pieces) and len(acc) < len(target):
            acc += pieces[i].strip().lower()
            s += scores[i]
            i += 1
        if acc != target:
            return None
        out.append(s)
    return (words, out) if i == len(pieces) else None


def _merge_words(pieces: list[str], scores: list[float]) -> tuple[list[str], list[float]]:
    words, out, cur, acc = [], [], "", 0.0
    for p, s in zip(pieces, scores):
        cur, acc = cur + p, acc + s
        if p.endswith(" "):
            words.append(cur.strip())
            out.append(acc)
            cur, acc = "", 0.0
    if cur.strip():
        words.append(cur.strip())
        out.append(acc)
    return words, out


def attribute_text(
    model: SparcModel, text_encoder: FeatureEncoder, text: str, target: Target | None = None, method: str = "grad"
) -> WordScores:
    """Per-word relevance of ``text`` for ``target`` (default: the caption's own code)."""
    if method not in TEXT_METHODS:
        raise AttributionError(f"unknown method {method!r}; methods: {list(TEXT_METHODS)}")
    if not isinstance(text_encoder, ClipTextEncoder):
        raise AttributionError(f"caption attribution needs the CLIP text tower (stream {text_encoder.stream!r} is not one)")
    if text_encoder.stream not in model.streams:
        raise AttributionError(f"the checkpoint has no stream {text_encoder.stream!r} (it has {model.streams})")
    target = target or text_target(model, text_encoder, text)
    clip = text_encoder.clip
    text = budget_text(text, clip.context_length)  # the words the model sees: the same cut as encoding
    tokens = clip.tokenize([text]).to(clip.device)
    ids = tokens[0].tolist()
    eot = int(tokens[0].argmax())  # open_clip pools at the end-of-text token (the largest id)
    rec, store = _Recorder(), {}

    def keep_embedding(module, inputs, output):
        if not output.requires_grad:  # a frozen tower: the embeddings carry the gradient themselves
            output = output.detach().requires_grad_(True)
        store["emb"] = output
        return output

    h = clip.model.token_embedding.register_forward_hook(keep_embedding)
    try:
        with torch.enable_grad(), _clip_attention(clip.model.transformer, rec):
            feats = clip.model.encode_text(tokens, normalize=True).float()
            logits = model.logits(text_encoder.stream, feats.to(model.device))
            score = (F.relu(logits) * target.tensor(model.n_latents, model.device)).sum()
            emb = store["emb"]
            grads = _input_grads(score, [emb, *rec.maps])
    finally:
        h.remove()
    if method == "grad":
        e = emb[0].detach()
        # baseline: the caption's mean word with the vocabulary's average token counted as one more word (the
        # caption's own mean alone would erase a one-word caption)
        vocab = clip.model.token_embedding.weight.detach().mean(0, keepdim=True)
        baseline = (e[1:eot].sum(0, keepdim=True) + vocab) / eot
        s = torch.zeros(len(e)) if grads[0] is None else (grads[0][0] * (e - baseline)).sum(-1).cpu()
    else:
        n = tokens.shape[1]
        r = torch.eye(n)
        for a, g in zip(rec.maps, grads[1:]):
            if g is not None:
                r = r + (g[0].float() * a[0].detach().float()).clamp_min(0).mean(0).cpu() @ r
        s = r[eot]
    span = list(range(1, eot))  # between start- and end-of-text
    pieces = _token_strings(clip.tokenizer, [ids[i] for i in span])
    piece_scores = [float(s[i]) for i in span]
    words, scores = _align_to_caption(text, pieces, piece_scores) or _merge_words(pieces, piece_scores)
    top = max((abs(x) for x in scores), default=0.0)
    return WordScores(words, [x / top if top > 0 else 0.0 for x in scores], method, target)


# ---- an image and its caption ------------------------------------------------------------------------------
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


def save_pair_png(pair: PairExplanation, path: str | Path) -> Path:
    """``pair_png`` written atomically to ``path``."""
    return _write(path, pair_png(pair))


def pair_png(pair: PairExplanation) -> bytes:
    """One row per shared latent: its heatmap over the image, and the caption with words shaded by score
    (PNG bytes)."""
    rows = max(1, len(pair.concepts))
    fig = _figure(9, 2.4 * rows)
    if not pair.concepts:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "the image and the caption share no agreed latent", ha="center", va="center")
    for r, c in enumerate(pair.concepts):
        ax = fig.add_subplot(rows, 2, 2 * r + 1)
        ax.imshow(c.heatmap.image)
        ax.imshow(c.heatmap.upsampled, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        name = c.heatmap.names.get(c.latent, "")
        ax.set_title(f"latent {c.latent}" + (f" '{name}'" if name else ""), fontsize=9, parse_math=False)
        ax.axis("off")
        tx = fig.add_subplot(rows, 2, 2 * r + 2)
        tx.axis("off")
        _word_strip(fig, tx, c.words.words, c.words.scores, fontsize=11)
    fig.suptitle(f"{pair.stream}: what the image and the caption share", fontsize=10)
    return _png(fig)


# ---- pictures ----------------------------------------------------------------------------------------------
def _title(target: Target, names: dict[int, str], activations: dict[int, float] | None = None, n: int = 4) -> str:
    parts = []
    for i, w in list(zip(target.latents, target.weights))[:n]:
        label = f"{i}" + (f" '{names[i]}'" if names.get(i) else "")
        parts.append(f"{label} w={w:.2f}")
    more = f" +{len(target.latents) - n} more" if len(target.latents) > n else ""
    return "latents " + ", ".join(parts) + more


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure with its own Agg canvas: no pyplot state, safe in the server's worker threads."""
    from .extras import require

    require("matplotlib", "plots", "pictures (heatmaps, word scores)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, **savefig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    return buf.getvalue()


def _write(path: str | Path, png: bytes) -> Path:
    from .atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), png)
    return Path(path)


def save_heatmap_png(hm: Heatmap, path: str | Path) -> Path:
    """``heatmap_png`` written atomically to ``path``."""
    return _write(path, heatmap_png(hm))


def heatmap_png(hm: Heatmap) -> bytes:
    """The crop the encoder saw, the heatmap over it (colormap + colorbar), the latents in the title (PNG
    bytes of HEATMAP_PNG_SIZE pixels)."""
    fig = _figure(HEATMAP_PNG_SIZE[0] / 100, HEATMAP_PNG_SIZE[1] / 100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(hm.image)
    im = ax.imshow(hm.upsampled, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="relevance (min 0, max 1)")
    src = f'"{hm.target.source}"' if hm.target.source != "latents" else "chosen latents"
    title = f"{hm.method} on {hm.stream}: {src}\n{_title(hm.target, hm.names)}"
    if not hm.target_fires:
        title += "\n(no target latent fires on this image: empty map)"
    ax.set_title(title, fontsize=8, parse_math=False)  # captions are plain text, never mathtext
    ax.axis("off")
    return _png(fig)


def _word_strip(fig: Any, ax: Any, words: list[str], scores: list[float], fontsize: int = 12) -> None:
    """Words left to right along ``ax``, each on a box shaded by its score (positive: red, negative: blue)."""
    from matplotlib import colormaps

    cmap = colormaps["bwr"]
    renderer = fig.canvas.get_renderer()
    x = 0.01
    for word, s in zip(words, scores):
        t = ax.text(
            x, 0.45, word, fontsize=fontsize, transform=ax.transAxes, va="center", parse_math=False,
            bbox={"facecolor": cmap(0.5 + 0.5 * s), "edgecolor": "none", "boxstyle": "round,pad=0.2"},
        )  # fmt: skip
        bb = t.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
        x = bb.x1 + 0.012


def save_words_png(ws: WordScores, path: str | Path, names: dict[int, str] | None = None) -> Path:
    """``words_png`` written atomically to ``path``."""
    return _write(path, words_png(ws, names))


def words_png(ws: WordScores, names: dict[int, str] | None = None) -> bytes:
    """The caption as a strip of words shaded by their score (positive: red, negative: blue; PNG bytes)."""
    width = max(4.0, 0.16 * sum(len(w) + 2 for w in ws.words))
    fig = _figure(min(width, 24), 1.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    _word_strip(fig, ax, ws.words, ws.scores)
    ax.set_title(f"{ws.method} attribution: {_title(ws.target, names or {})}", fontsize=8, parse_math=False)
    return _png(fig, bbox_inches="tight")


__all__ = [
    "words_png",
    "pair_png",
    "heatmap_png",
    "METHODS",
    "TEXT_METHODS",
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
