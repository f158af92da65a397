"""Alignment over a family of planted-concept worlds: train one configuration on one world, measure it.

Every number is computed with each stream encoded alone (the serving case) on held-out samples and
set against what the world allows: the ceiling of one-stream agreement is the Jaccard of the concept
sets that each stream can see, known because the generator planted them. Used by
``bench/alignment.py`` (the full table) and by the test that keeps the defaults from regressing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SynthConfig, TrainConfig
from ..metrics import dead_expected, encode_alone, evaluate, latent_rates, retrieval_scores
from .synthetic import PlantedConcepts, ceiling, write_synthetic

# The paper's recipe: Global TopK + cross-reconstruction, none of this project's additions.
PAPER = {
    "min_rel_activation": 0.0,
    "private_latents": 0,
    "align_coef": 0.0,
    "alone_select_prob": 0.0,
    "prune_unused": False,
    "calibrate_rounds": 0,
    "revive_after": None,  # AuxK only, as in the paper: no re-initialisation
}
# The Local-TopK baseline (each stream picks its own latents, no cross-reconstruction).
LOCAL = PAPER | {"topk": "local", "cross_coef": 0.0}

QUERY, IMAGE_STREAMS = "clip_txt", ("dino", "clip_img")


# The planted worlds bench/alignment.py and bench/naming.py measure on.
SMALL_DIMS = {"dino": 256, "clip_img": 192, "clip_txt": 192}  # smaller than ViT-L's, so the multiples fit on 2 cores
VITL_DIMS = {"dino": 1024, "clip_img": 768, "clip_txt": 768}  # ViT-L/14's DINOv2 and CLIP widths
# name -> (preset, world overrides, dictionary: an int, or a float multiple of the concept inventory,
#          stream dims, training samples, steps (None: --steps))
WORLDS: dict[str, tuple[str, dict, int | float, dict[str, int], int, int | None]] = {
    # ViT-L widths, a fixed dictionary of 4096 latents with k 32 and 1,500 steps:
    # (a) samples hold 1-4 concepts, so items share concepts and near-ties are common;
    "few-vitl": (
        "groups",
        {"n_concepts": 2000, "concepts_per_sample": 2.0, "max_concepts_per_sample": 4},
        4096,
        VITL_DIMS,
        30_000,
        1500,
    ),
    # (b) concepts outnumber latents 3x, in a hierarchy, with a correlated CLIP text tower.
    "open-vitl": ("hierarchy", {"n_concepts": 12_288, "tower_correlation": 0.6}, 4096, VITL_DIMS, 30_000, 1500),
    "groups-0.5x": ("groups", {}, 0.5, SMALL_DIMS, 16_000, None),
    "groups-6x": ("groups", {"n_concepts": 400}, 6.0, SMALL_DIMS, 16_000, None),
    "hierarchy-0.5x": ("hierarchy", {}, 0.5, SMALL_DIMS, 16_000, None),
    "many-0.5x": ("many", {}, 0.5, SMALL_DIMS, 16_000, None),
    "flat-8x": ("flat", {}, 8.0, SMALL_DIMS, 16_000, None),
    "dense-0.5x": ("dense", {}, 0.5, SMALL_DIMS, 16_000, None),
    "noisy-4x": ("noisy", {}, 4.0, SMALL_DIMS, 16_000, None),
    "gap-4x": ("gap", {}, 4.0, SMALL_DIMS, 16_000, None),
}


def world_data(world: SynthConfig, out: Path) -> dict[str, Any]:
    """Write (or reuse) a world's train/eval files; returns paths, eval arrays, per-pair ceilings and the
    concepts each stream can see in each eval sample (for the oracle)."""
    if not (out / "synth.json").is_file():
        write_synthetic(world, out)
    planted = PlantedConcepts(world)
    labels = np.load(out / "eval" / "labels.npy")
    streams = list(world.streams)
    return {
        "train": {s: str(out / "train" / f"{s}.npy") for s in streams},
        "train_labels": str(out / "train" / "labels.npy"),
        "eval": {s: np.load(out / "eval" / f"{s}.npy") for s in streams},
        "eval_labels": labels,
        "ceiling": ceiling(planted, labels),
        "visible": planted.visible_labels(labels),
    }


def oracle_recall_at_1(query_sets: np.ndarray, gallery_sets: np.ndarray) -> float:
    """Recall@1 of a perfect concept code: query i's concept set against the gallery's by cosine, item i the
    match, ties shared at random (a tie of m items at the top counts 1/m)."""
    q = F.normalize(torch.as_tensor(query_sets, dtype=torch.float64), dim=1)
    g = F.normalize(torch.as_tensor(gallery_sets, dtype=torch.float64), dim=1)
    scores = q @ g.T
    true = scores.diagonal().unsqueeze(1)
    above = (scores > true + 1e-12).sum(1)
    tied = (scores >= true - 1e-12).sum(1) - above
    return float(torch.where(above == 0, 1.0 / tied, torch.zeros_like(tied, dtype=torch.float64)).mean())


def agreed_rates(model: Any, train: dict[str, str], rows: int = 20_000) -> dict[str, torch.Tensor]:
    """Per stream, each latent's share of the first ``rows`` training rows on which its agreed code fires."""
    streams = [s for s in model.streams if s in train]
    feats = {s: np.asarray(np.load(train[s], mmap_mode="r")[:rows], dtype=np.float32) for s in streams}
    return {s: latent_rates(c) for s, c in encode_alone(model, feats, code="agreed").items()}


def measure(model: Any, data: dict[str, Any], gallery: int = 2000) -> dict[str, Any]:
    """One row of the alignment table for a trained model on a world's held-out samples.

    Dead latents are reported three ways: never agreed on the held-out rows (``dead``), never agreed on
    20,000 training rows (``dead_train``: latents no explanation or name can ever use), and the share a
    dictionary whose latents all fire at their training rates would still miss on that many held-out rows
    (``dead_sampling``: rare latents are absent from a small sample without being dead)."""
    feats, labels = data["eval"], data["eval_labels"]
    report = evaluate(model, feats, labels=labels, gallery=gallery)
    rates = agreed_rates(model, data["train"])
    pairs = report["pairs"]
    ratios = [pairs[p]["jaccard"] / max(data["ceiling"][p], 1e-9) for p in pairs]
    row: dict[str, Any] = {
        "jaccard": report["summary"]["mean_jaccard"],
        "ceiling": float(np.mean([data["ceiling"][p] for p in pairs])),
        "jaccard_vs_ceiling": float(np.mean(ratios)),
        "worst_pair_vs_ceiling": float(min(ratios)),
        "label_jaccard": report["summary"].get("mean_label_jaccard"),
        "dead": {s: v["dead_fraction"] for s, v in report["streams"].items()},
        "dead_train": {s: float((r == 0).double().mean()) for s, r in rates.items()},
        "dead_sampling": {s: dead_expected(r, len(labels)) for s, r in rates.items()},
        "dead_search": {s: v["dead_fraction_search"] for s, v in report["streams"].items()},
        "l0": report["summary"]["mean_l0"],
        "l0_search": report["summary"]["mean_l0_search"],
        "soft_weight": report["summary"]["soft_weight"],
        "nmse_self": report["summary"]["mean_nmse_self"],
        "nmse_self_shared": report["summary"]["mean_nmse_self_shared"],
        "nmse_cross": report["summary"]["mean_nmse_cross"],
    }
    g = min(gallery, len(labels))
    for target in IMAGE_STREAMS:
        key = f"{QUERY}->{target}"
        if key in pairs:
            for path in ("latent", "latent_topk", "xrecon"):
                r = pairs[key][f"retrieval_{path}"]
                row[f"{key} {path}"] = {"R@1": r["R@1"], "R@10": r["R@10"]}
            if "visible" in data:
                row[f"{key} oracle R@1"] = oracle_recall_at_1(data["visible"][QUERY][:g], data["visible"][target][:g])
    if QUERY in feats and "clip_img" in feats:  # the raw-feature reference a user has without SPARC
        q = F.normalize(torch.as_tensor(feats[QUERY][:g]), dim=1)
        x = F.normalize(torch.as_tensor(feats["clip_img"][:g]), dim=1)
        row["raw clip_txt->clip_img R@1"] = retrieval_scores(q @ x.T)["R@1"]
    return row


def run(
    world: SynthConfig,
    train_overrides: dict[str, Any],
    work: Path,
    data: dict[str, Any] | None = None,
    progress: bool = False,
    reuse: bool = False,
) -> dict[str, Any]:
    """Train ``train_overrides`` (over the shipped defaults) on ``world`` under ``work``, then measure.
    ``reuse``: measure the checkpoint ``work`` already holds instead of training again (its train_s is 0)."""
    from ..checkpoint import is_checkpoint, load_checkpoint
    from ..train import train

    data = data or world_data(world, work / "data")
    cfg = TrainConfig(
        features=data["train"],
        labels=data["train_labels"],
        out=str(work / "model"),
        progress=progress,
        **({"eval_every": 10**9, "val_rows": 0} | train_overrides),
    )
    cfg = cfg.model_copy(update={"save_every": cfg.steps})
    t0 = time.perf_counter()
    if not (reuse and is_checkpoint(cfg.out)):
        train(cfg)
    seconds = time.perf_counter() - t0
    model = load_checkpoint(cfg.out)
    row = measure(model, data)
    row["train_s"] = seconds
    row["n_latents"] = {"requested": cfg.model.n_latents, "kept": model.n_latents}
    return row
