"""The product measured on rendered scenes, where every object, attribute and mask is known.

Used by ``bench/scenes.py`` (the table) and its CI-sized test. Every figure is computed on held-out scenes
with each stream encoded alone, against the ground truth of ``sparc_core.worlds.scenes``:

- text -> image retrieval per single-concept query ("a red triangle": one colour and one shape): precision@10
  and average precision over the gallery images that hold such an object; beside it what a stream's
  features allow (a linear classifier per query trained with the labels, ``readout_scores``);
- localisation per (image, class), as the SPARC authors score COCO: the class phrase as the query, the
  ground truth the union of that class's visible masks in the image (carried through the encoder's own
  resize and crop); pointing game (the map's peak inside the mask), the map cut at its Otsu threshold
  (at 0.3 of its peak when Otsu keeps nothing) as the predicted mask, its IoU with the truth, and
  COCO-style mask AP at IoU 0.2 (one prediction per (image, class) with equal scores, 101-point
  interpolated precision per class, mean over classes). Every method of a table is scored on the same
  pairs (classes visible in every encoder's crop); a method that yields no map (a phrase with no latent,
  a target that does not fire, a flat map) detects nothing: a pointing miss, IoU 0, no prediction in mask
  AP. CLIP's own baselines need no latent and never depend on the SAE;
- caption attribution: the share of captions whose object words (shapes, colours, textures) outrank every
  filler word;
- naming: the share of latents (active on held-out DINO codes) whose name, read from the CLIP text tower,
  is the attribute that fires them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..explain.attribution import AttributionError, Heatmap, Target, attribute_text, localize, text_target
from ..explain.naming import name_latents, naming_score
from ..extras import require
from ..model import SparcModel
from .scenes import SceneFamily, family_of, instance_mask

STREAMS = ("dino", "clip_img", "clip_txt")


def scene_features(scenes: Path, encoders: Any, work: Path, n_train: int) -> dict[str, dict[str, np.ndarray]]:
    """Every stream's features of a scenes folder, extracted once through the real loaders into WORK/features,
    split into WORK/train and WORK/test (the first ``n_train`` scenes train; labels beside them); returns
    {"train": {stream: rows}, "test": {...}}."""
    from ..config import ExtractConfig
    from ..extract import extract

    out = work / "features"
    if not (out / "ids.txt").is_file():
        cfg = ExtractConfig(images=str(scenes / "images"), captions=str(scenes / "captions.csv"), out=str(out),
                            encoders=encoders, workers=0, progress=False)  # fmt: skip
        extract(cfg)
    feats = {s: np.load(out / f"{s}.npy") for s in STREAMS}
    labels = np.load(scenes / "labels.npy")
    split: dict[str, dict[str, np.ndarray]] = {}
    for name, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        (work / name).mkdir(exist_ok=True)
        for s in STREAMS:
            if not (work / name / f"{s}.npy").is_file():
                np.save(work / name / f"{s}.npy", feats[s][rows])
        np.save(work / name / "labels.npy", labels[rows])
        split[name] = {s: feats[s][rows] for s in STREAMS}
    return split


# ---- retrieval ---------------------------------------------------------------------------------------------
def _query_pairs(records: list[dict]) -> list[tuple[str, str]]:
    return sorted({(o["colour"], o["shape"]) for r in records for o in r["objects"]})


def concept_queries(records: list[dict], family: SceneFamily) -> list[tuple[str, np.ndarray]]:
    """(query text, [n] bool relevant) for every colour x shape pair some gallery scene holds."""
    pairs = _query_pairs(records)
    out = []
    for colour, shape in pairs:
        relevant = np.array([any(o["colour"] == colour and o["shape"] == shape for o in r["objects"]) for r in records])
        out.append((family.phrase(colour, shape), relevant))
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


def retrieval_ceiling(queries: list[tuple[str, np.ndarray]], k: int = 10) -> dict[str, float]:
    """What a perfect ranking reaches on the concept queries: every relevant image first (mAP 1; P@k below 1
    where a query has fewer than k relevant images)."""
    return {f"P@{k}": float(np.mean([min(int(rel.sum()), k) / k for _, rel in queries])), "mAP": 1.0, "queries": len(queries)}


def one_attribute_floor(
    records: list[dict], family: SceneFamily, attribute: str, k: int = 10, orders: int = 20
) -> dict[str, float]:
    """What a ranker that sees ONE attribute of the query reaches on the concept queries: each scene scored
    by how many of its objects have the query's colour (``attribute`` "colour") or shape ("shape"), equal
    scores in random order (mean over ``orders`` orders). A tower that tells colours apart but not shapes
    sits on the colour floor, however good the retrieval built on it."""
    if attribute not in ("colour", "shape"):
        raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")
    rng = np.random.default_rng(0)
    prec, ap = [], []
    for (colour, shape), (_, relevant) in zip(_query_pairs(records), concept_queries(records, family)):
        value = colour if attribute == "colour" else shape
        count = np.array([sum(o[attribute] == value for o in r["objects"]) for r in records], dtype=np.float64)
        for _ in range(orders):
            p, a = precision_and_ap(count + 0.5 * rng.random(len(records)), relevant, k)  # ties: a random order
            prec.append(p)
            ap.append(a)
    return {f"P@{k}": float(np.mean(prec)), "mAP": float(np.mean(ap)), "queries": len(prec) // orders}


def readout_scores(
    train_x: np.ndarray,
    train_records: list[dict],
    test_x: np.ndarray,
    test_records: list[dict],
    steps: int = 300,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> np.ndarray:
    """What one stream's features allow for the concept queries: a linear classifier per colour x shape pair,
    trained with the labels (which no SPARC model and no tower sees) on ``train_x``, scoring ``test_x``.
    Returns [queries, n_test] logits in the order of ``concept_queries(test_records, ...)``: the ceiling of
    any text -> image search that reads these features linearly, however it was trained."""
    pairs = _query_pairs(test_records)
    y = np.array([[any(o["colour"] == c and o["shape"] == s for o in r["objects"]) for c, s in pairs]
                  for r in train_records], dtype=np.float32)  # fmt: skip
    if len(y) != len(train_x):
        raise ValueError(f"{len(train_x)} training rows but {len(train_records)} training records")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.from_numpy(((train_x - mean) / std).astype(np.float32))
    target = torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], len(pairs))
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.copy_(torch.logit(target.mean(0).clamp(1e-3, 1 - 1e-3)))
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):  # full batch: the rows are few and the features small
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(lin(x), target).backward()
        opt.step()
    with torch.no_grad():
        return lin(torch.from_numpy(((test_x - mean) / std).astype(np.float32))).T.numpy()


def code_scores(query: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """[q, n] cosine between dense codes (or any vectors)."""
    return (F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T).numpy()


# ---- localisation ------------------------------------------------------------------------------------------
def mask_in_crop(mask: np.ndarray, encoder: Any) -> np.ndarray:
    """An image-sized bool mask carried through the encoder's resize and centre crop (nearest neighbour)."""
    transforms = require("torchvision.transforms", "encoders", "localisation scoring")
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


def phrase(obj: dict, family: SceneFamily) -> str:
    """The plain query for one object in its family's grammar: "a red triangle", "a kite in teal"."""
    return family.phrase(obj["colour"], obj["shape"])


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


@dataclass
class LocalisationPair:
    """One (image, class) of a localisation table: the class phrase and its mask in each stream's crop."""

    scene: str  # the scene's id
    cls: str  # "red triangle": what mask AP groups by
    query: str  # the class phrase in the family's grammar
    masks: dict[str, np.ndarray]  # stream -> [H, W] bool in that encoder's crop


def localisation_pairs(
    scenes: Path, records: list[dict], encoders: dict[str, Any], max_pairs: int = 300, family: SceneFamily | None = None
) -> list[LocalisationPair]:
    """The first ``max_pairs`` (image, class) pairs whose class is visible in EVERY encoder's crop, so that
    every row of a table is scored on the same pairs (an encoder that crops an object away would otherwise
    be scored on fewer, easier or harder, pairs)."""
    family = family or family_of(scenes)
    pairs: list[LocalisationPair] = []
    for r in records:
        by_class: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for j, obj in enumerate(r["objects"]):
            full = instance_mask(scenes, r["id"], j)
            masks = by_class.setdefault((obj["colour"], obj["shape"]), {})
            for stream, enc in encoders.items():
                m = mask_in_crop(full, enc)
                masks[stream] = masks[stream] | m if stream in masks else m
        for (colour, shape), masks in by_class.items():
            if len(pairs) >= max_pairs:
                return pairs
            if all(m.any() for m in masks.values()):
                pairs.append(LocalisationPair(r["id"], f"{colour} {shape}", family.phrase(colour, shape), masks))
    return pairs


HeatmapOf = Callable[[Image.Image, str], "Heatmap | None"]  # (image, class phrase) -> map, None: no detection


def sparc_heatmaps(
    model: SparcModel, encoder: Any, text_encoder: Any, method: str = "relevance", code: str = "agreed", **options: Any
) -> HeatmapOf:
    """SPARC's map of a phrase on an image: the phrase's latents (CLIP text tower -> ``code``) looked for
    in ``encoder``'s stream. None (no detection) when the phrase has no such latent or none fires on the image."""

    def heatmap_of(image: Image.Image, query: str) -> Heatmap | None:
        try:
            target = text_target(model, text_encoder, query, code=code)
        except AttributionError:
            return None
        hm = localize(model, encoder, image, target, method=method, text_encoder=text_encoder, **options)
        return hm if hm.target_fires else None

    return heatmap_of


def clip_heatmaps(
    model: SparcModel, encoder: Any, text_encoder: Any, method: str = "clip-relevance", **options: Any
) -> HeatmapOf:
    """CLIP's own map of a phrase on the CLIP image tower (``clip-relevance`` or ``clip-cosine``): it needs no
    latent, so nothing of the SAE (not even whether the phrase has latents) decides it."""

    def heatmap_of(image: Image.Image, query: str) -> Heatmap | None:
        target = Target([], [], source=query)
        return localize(model, encoder, image, target, method=method, text_encoder=text_encoder, **options)

    return heatmap_of


def localisation_table(scenes: Path, pairs: list[LocalisationPair], stream: str, heatmap_of: HeatmapOf) -> dict[str, float]:
    """Pointing game, mIoU, share with IoU >= 0.2 and mask AP@0.2 of one method over ``pairs`` (scored in
    ``stream``'s crop). A method that gives no map, or a flat one, detects nothing: a miss in the pointing
    game, IoU 0, and no prediction in mask AP."""
    rows, classes, ious = [], [], []
    for pair in pairs:
        with Image.open(scenes / "images" / f"{pair.scene}.png") as im:
            image = im.convert("RGB")
        hm = heatmap_of(image, pair.query)
        classes.append(pair.cls)
        if hm is None or float(hm.upsampled.max() - hm.upsampled.min()) <= 0:
            rows.append({"pointing": 0.0, "iou": 0.0, "iou>=0.2": 0.0, "detected": 0.0})
            ious.append(None)
            continue
        scores = localisation_scores(hm.upsampled, pair.masks[stream])
        rows.append(scores | {"detected": 1.0})
        ious.append(scores["iou"])
    keys = ("pointing", "iou", "iou>=0.2", "detected")
    means = {k: float(np.mean([x[k] for x in rows])) if rows else float("nan") for k in keys}
    return means | {"mask_AP@0.2": mask_ap(classes, ious), "pairs": len(rows)}


# ---- caption attribution and naming --------------------------------------------------------------------------


def attribution_table(
    model: SparcModel, text_encoder: Any, records: list[dict], family: SceneFamily, method: str = "grad",
    max_captions: int = 300,
) -> dict[str, float]:  # fmt: skip
    """Share of captions whose best object word outranks every other word (fillers, articles, relations)."""
    object_words = family.object_words()
    wins, silent = [], 0
    for r in records[:max_captions]:
        try:
            ws = attribute_text(model, text_encoder, r["caption"], method=method)
        except AttributionError:  # the caption activates no agreed latent: nothing to attribute, a miss
            wins.append(0.0)
            silent += 1
            continue
        words = [re.sub(r"[^a-z]", "", w.lower()) for w in ws.words]
        obj = [s for w, s in zip(words, ws.scores) if w in object_words]
        other = [s for w, s in zip(words, ws.scores) if w not in object_words]
        if obj and other:
            wins.append(float(max(obj) > max(other)))
    return {"object_word_first": float(np.mean(wins)) if wins else float("nan"), "captions": len(wins), "no_latent": silent}


def naming_table(
    model: SparcModel, text_encoder: Any, image_codes: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
    family: SceneFamily,
) -> dict[str, float]:  # fmt: skip
    """Name latents by the concept words (CLIP text tower) and score the names against DINO firings."""
    concepts = family.concepts
    vectors = text_encoder.encode_texts(concepts).numpy()
    named = name_latents(model, text_encoder.stream, vectors, concepts)
    score = naming_score(named, image_codes[0], image_codes[1], labels, concepts)
    return {"named_right": float(score["top1"]), "scored_latents": int(score["scored_latents"])}
