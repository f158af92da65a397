"""The product measured on rendered scenes, where every object, attribute and mask is known.

Used by ``bench/scenes.py`` (the table) and its CI-sized test. Every figure is computed on held-out scenes
with each stream encoded alone, against the ground truth of ``sparc_core.scenes``:

- text -> image retrieval per single-concept query ("a red triangle": one colour and one shape): precision@10
  and average precision over the gallery images that hold such an object;
- localisation per (image, object): the object's phrase as the query; pointing game (the map's peak inside
  the object's visible mask), IoU of the map cut at half its range with the mask, and the share of pairs
  with IoU >= 0.2; masks are carried through the encoder's own resize and crop;
- caption attribution: the share of captions whose object words (shapes, colours, textures) outrank every
  filler word;
- naming: the share of latents (active on held-out DINO codes) whose name, read from the CLIP text tower,
  is the attribute that fires them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from .attribution import AttributionError, attribute_text, localize, text_target
from .model import SparcModel
from .naming import name_latents, naming_score
from .scenes import COLOUR_WORDS, CONCEPTS, SHAPE_WORDS, TEXTURE_WORDS, instance_mask


# ---- retrieval ---------------------------------------------------------------------------------------------
def concept_queries(records: list[dict]) -> list[tuple[str, np.ndarray]]:
    """(query text, [n] bool relevant) for every colour x shape pair some gallery scene holds."""
    pairs = sorted({(o["colour"], o["shape"]) for r in records for o in r["objects"]})
    out = []
    for colour, shape in pairs:
        relevant = np.array([any(o["colour"] == colour and o["shape"] == shape for o in r["objects"]) for r in records])
        out.append((f"a {colour} {shape}", relevant))
    return out


def precision_and_ap(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Precision@k and average precision of one query's [n] scores (ties broken against the query)."""
    order = np.lexsort((relevant.astype(int), -scores))  # among equal scores, irrelevant items first
    hits = relevant[order]
    prec_k = float(hits[:k].mean())
    ranks = np.flatnonzero(hits) + 1
    ap = float(np.mean(np.arange(1, len(ranks) + 1) / ranks)) if len(ranks) else 0.0
    return prec_k, ap


def retrieval_table(query_scores: Callable[[list[str]], np.ndarray], queries: list[tuple[str, np.ndarray]]) -> dict[str, float]:
    """Mean precision@10 and mAP of a scorer ([q texts] -> [q, n] scores) over the concept queries."""
    scores = query_scores([q for q, _ in queries])
    rows = [precision_and_ap(s, rel) for s, (_, rel) in zip(scores, queries)]
    return {"P@10": float(np.mean([p for p, _ in rows])), "mAP": float(np.mean([a for _, a in rows])), "queries": len(rows)}


def code_scores(query: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """[q, n] cosine between dense codes (or any vectors)."""
    return (F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T).numpy()


# ---- localisation ------------------------------------------------------------------------------------------
def mask_in_crop(mask: np.ndarray, encoder: Any) -> np.ndarray:
    """An image-sized bool mask carried through the encoder's resize and centre crop (nearest neighbour)."""
    steps = []
    for t in getattr(encoder.preprocess, "transforms", []):
        if isinstance(t, transforms.Resize):
            steps.append(transforms.Resize(t.size, interpolation=transforms.InterpolationMode.NEAREST))
        elif isinstance(t, transforms.CenterCrop):
            steps.append(t)
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    for t in steps:
        img = t(img)
    return np.asarray(img) > 127


def phrase(obj: dict) -> str:
    """The plain query for one object: "a red triangle"."""
    return f"a {obj['colour']} {obj['shape']}"


def localisation_scores(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Pointing game, IoU of the map cut at half its range, and whether that IoU reaches 0.2."""
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    cut = heat >= (heat.min() + 0.5 * (heat.max() - heat.min())) if heat.max() > heat.min() else np.zeros_like(mask)
    inter, union = (cut & mask).sum(), (cut | mask).sum()
    iou = float(inter / union) if union else 0.0
    return {"pointing": float(mask[peak]), "iou": iou, "iou>=0.2": float(iou >= 0.2)}


def localisation_table(
    model: SparcModel,
    image_encoder: Any,
    text_encoder: Any,
    scenes: Path,
    records: list[dict],
    method: str,
    max_pairs: int = 300,
) -> dict[str, float]:
    """Mean pointing game / IoU / IoU>=0.2 over (image, object) pairs, each object's phrase as the query."""
    rows = []
    for r in records:
        with Image.open(scenes / "images" / f"{r['id']}.png") as im:
            image = im.convert("RGB")
        for j, obj in enumerate(r["objects"]):
            if len(rows) >= max_pairs:
                break
            mask = mask_in_crop(instance_mask(scenes, r["id"], j), image_encoder)
            if not mask.any():
                continue  # the object lies outside the encoder's crop
            try:
                target = text_target(model, text_encoder, phrase(obj))
            except AttributionError:  # the phrase activates no agreed latent: nothing to look for, a miss
                rows.append({"pointing": 0.0, "iou": 0.0, "iou>=0.2": 0.0, "fires": 0.0})
                continue
            hm = localize(model, image_encoder, image, target, method=method, text_encoder=text_encoder)
            rows.append(localisation_scores(hm.upsampled, mask) | {"fires": float(hm.target_fires)})
        if len(rows) >= max_pairs:
            break
    keys = ("pointing", "iou", "iou>=0.2", "fires")
    return {k: float(np.mean([x[k] for x in rows])) for k in keys} | {"pairs": len(rows)}


# ---- caption attribution and naming --------------------------------------------------------------------------
OBJECT_WORDS = {
    w for words in (*SHAPE_WORDS.values(), *COLOUR_WORDS.values(), *TEXTURE_WORDS.values()) for p in words for w in p.split()
}


def attribution_table(
    model: SparcModel, text_encoder: Any, records: list[dict], method: str = "grad", max_captions: int = 300
) -> dict[str, float]:
    """Share of captions whose best object word outranks every other word (fillers, articles, relations)."""
    wins, silent = [], 0
    for r in records[:max_captions]:
        try:
            ws = attribute_text(model, text_encoder, r["caption"], method=method)
        except AttributionError:  # the caption activates no agreed latent: nothing to attribute, a miss
            wins.append(0.0)
            silent += 1
            continue
        words = [re.sub(r"[^a-z]", "", w.lower()) for w in ws.words]
        obj = [s for w, s in zip(words, ws.scores) if w in OBJECT_WORDS]
        other = [s for w, s in zip(words, ws.scores) if w not in OBJECT_WORDS]
        if obj and other:
            wins.append(float(max(obj) > max(other)))
    return {"object_word_first": float(np.mean(wins)) if wins else float("nan"), "captions": len(wins), "no_latent": silent}


def naming_table(
    model: SparcModel, text_encoder: Any, image_codes: tuple[np.ndarray, np.ndarray], labels: np.ndarray
) -> dict[str, float]:
    """Name latents by the concept words (CLIP text tower) and score the names against DINO firings."""
    vectors = text_encoder.encode_texts(list(CONCEPTS)).numpy()
    named = name_latents(model, text_encoder.stream, vectors, list(CONCEPTS))
    score = naming_score(named, image_codes[0], image_codes[1], labels, list(CONCEPTS))
    return {"named_right": float(score["top1"]), "scored_latents": int(score["scored_latents"])}
