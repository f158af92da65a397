"""The product measured on rendered scenes, where every object, attribute and mask is known.

Used by ``bench/scenes.py`` (the table) and its CI-sized test. Every figure is computed on held-out scenes
with each stream encoded alone, against the ground truth of ``sparc_core.scenes``:

- text -> image retrieval per single-concept query ("a red triangle": one colour and one shape): precision@10
  and average precision over the gallery images that hold such an object;
- localisation per (image, class), as the SPARC authors score COCO: the class phrase as the query, the
  ground truth the union of that class's visible masks in the image (carried through the encoder's own
  resize and crop); pointing game (the map's peak inside the mask), the map cut at its Otsu threshold
  (at 0.3 of its peak when Otsu keeps nothing) as the predicted mask, its IoU with the truth (mIoU: a
  phrase that activates no latent counts 0), and COCO-style mask AP at IoU 0.2 (one prediction per
  (image, class) with equal scores, 101-point interpolated precision per class, mean over classes);
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


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a map: the cut that maximises the between-class variance of a 256-bin histogram."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1].astype(np.float64)
    w1 = len(v) - w0
    s0 = np.cumsum(counts * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float((counts * centres).sum()) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def predicted_mask(heat: np.ndarray, fallback: float = 0.3) -> np.ndarray:
    """The map min-max scaled and cut at its Otsu threshold; at ``fallback`` of its peak if that keeps nothing."""
    span = float(heat.max() - heat.min())
    if span <= 0:
        return np.zeros(heat.shape, dtype=bool)
    h = (heat - heat.min()) / span
    cut = h >= otsu_threshold(h)
    return cut if cut.any() else h >= fallback * h.max()


def localisation_scores(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Pointing game, and the IoU of the map's Otsu cut with the mask."""
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    cut = predicted_mask(heat)
    inter, union = (cut & mask).sum(), (cut | mask).sum()
    iou = float(inter / union) if union else 0.0
    return {"pointing": float(mask[peak]), "iou": iou, "iou>=0.2": float(iou >= 0.2)}


def mask_ap(classes: list[str], ious: list[float | None], threshold: float = 0.2) -> float:
    """COCO-style mask AP at one IoU threshold, one ground truth and at most one prediction per entry.

    ``ious[i]`` is the IoU of entry i's prediction with its ground truth, ``None`` where nothing was
    predicted. All predictions score the same (a heatmap has no confidence of its own), so each class's
    precision-recall curve follows the entries' order, as COCOeval's stable sort does; precision is made
    monotone and read at 101 recall points; classes are averaged.
    """
    per_class = []
    for c in sorted(set(classes)):
        idx = [i for i, k in enumerate(classes) if k == c]
        hits = np.array([ious[i] is not None and ious[i] >= threshold for i in idx if ious[i] is not None], dtype=bool)
        n_gt = len(idx)
        if not hits.size:
            per_class.append(0.0)
            continue
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        recall = tp / n_gt
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        at = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
        per_class.append(float(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0).mean()))
    return float(np.mean(per_class)) if per_class else float("nan")


def localisation_table(
    model: SparcModel,
    image_encoder: Any,
    text_encoder: Any,
    scenes: Path,
    records: list[dict],
    method: str,
    max_pairs: int = 300,
) -> dict[str, float]:
    """Pointing game, mIoU, share with IoU >= 0.2 and mask AP@0.2 over (image, class) pairs.

    The class phrase ("a red triangle") is the query; the truth is the union of that class's visible masks.
    """
    rows, classes, ious = [], [], []
    for r in records:
        with Image.open(scenes / "images" / f"{r['id']}.png") as im:
            image = im.convert("RGB")
        by_class: dict[str, np.ndarray] = {}
        for j, obj in enumerate(r["objects"]):
            m = mask_in_crop(instance_mask(scenes, r["id"], j), image_encoder)
            by_class[phrase(obj)] = by_class[phrase(obj)] | m if phrase(obj) in by_class else m
        for query, mask in by_class.items():
            if len(rows) >= max_pairs:
                break
            if not mask.any():
                continue  # the object lies outside the encoder's crop
            classes.append(query)
            try:
                target = text_target(model, text_encoder, query)
            except AttributionError:  # the phrase activates no agreed latent: nothing to look for, a miss
                rows.append({"pointing": 0.0, "iou": 0.0, "iou>=0.2": 0.0, "fires": 0.0})
                ious.append(None)
                continue
            hm = localize(model, image_encoder, image, target, method=method, text_encoder=text_encoder)
            scores = localisation_scores(hm.upsampled, mask)
            rows.append(scores | {"fires": float(hm.target_fires)})
            ious.append(scores["iou"])
        if len(rows) >= max_pairs:
            break
    keys = ("pointing", "iou", "iou>=0.2", "fires")
    means = {k: float(np.mean([x[k] for x in rows])) for k in keys}
    return means | {"mask_AP@0.2": mask_ap(classes, ious), "pairs": len(rows)}


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
