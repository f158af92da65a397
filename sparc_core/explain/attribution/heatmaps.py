"""Image heatmaps of a target (``localize``): relevance, Grad-CAM, gradient x input, and CLIP's own baselines."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...encoders import FeatureEncoder
from ...model import SparcModel
from .hooks import (
    _clip_attention,
    _grid,
    _input_grads,
    _last_tokens,
    _Recorder,
    _resnet_attention,
    _timm_attention,
    _vision,
)
from .targets import CLIP_METHODS, METHOD_ALIASES, METHODS, SCORES, AttributionError, Heatmap, Target


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
        if not kind.startswith("clip"):
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
        elif kind == "clip-resnet":
            prefix = 1  # the attention pool's query: the mean of the grid
            with _resnet_attention(vit, rec, store):
                feats = encoder.clip.model.encode_image(pixels, normalize=True)
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
            g = g[0].float()
            if kind == "clip-resnet":  # layer4's grid also reaches the output through the mean token
                g = g[prefix:] + g[:prefix] / (len(g) - prefix)
            else:
                g = g[prefix:]
            m = (a * g.mean(0, keepdim=True)).sum(-1).clamp_min(0)
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
            if kind == "clip-resnet":  # each grid token through the pool's value and output projections (MaskCLIP)
                pool = vit.attnpool
                patch = pool.c_proj(pool.v_proj(tokens[0, prefix:].detach()))
            else:
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
