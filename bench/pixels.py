"""What each training addition costs or buys on pixels: two rendered scene families and a planted world.

    python bench/pixels.py [--families shapes,glyphs] [--work runs/pixels] [--steps 2000] [--json out.json]

Per scene family (``sparc_core.worlds.scenes.FAMILIES``: other shapes, colours, textures, background and caption
grammar), on held-out scenes no tower and no SPARC model saw:

1. `sparc scenes`: --n scenes of the family (the last 1,000 held out);
2. towers: the committed ones under bench/towers/FAMILY (see its README: the command and commit that made
   them), trained again only where missing: a DINOv2-layout ViT by masked image modelling (no label, no caption)
   and an open_clip-layout CLIP on the captions; their own quality is printed (linear probe, zero-shot);
3. `sparc extract` through the real loaders;
4. SPARC trained with the same budget in every configuration: the paper's recipe, the paper plus each
   addition of the defaults alone, the defaults (all of them);
5. every configuration measured on the same items with the same scorers: text -> DINO retrieval (P@10 and
   mAP of the colour x shape queries, latent cosine of the search codes), one-stream Jaccard of caption and
   DINO codes (agreed; empty codes count 0, their share beside), dead latents (never in a held-out agreed
   DINO code), paired text -> DINO R@10 (each held-out caption's own image among the 1,000: what a
   validation split of the user's pairs sees, with no label), and localisation of the class phrase on the
   SAME (image, class) pairs for every row (pointing game, mIoU, mask AP@0.2); beside them what a user
   would pick instead: raw CLIP text -> CLIP image, and CLIP's own image-text relevance (every block, and
   from the last block as the SPARC authors' code starts) and patch-text cosine, which never depend on the
   SAE; and what each tower's features allow: a linear classifier per query read from the DINO (or CLIP
   image) features with the labels, which no SPARC model sees (``scenes_eval.readout_scores``).

Then the same configurations on one planted-concept world with more concepts than latents (served text ->
DINO R@1 against the oracle, one-stream Jaccard against the ceiling, dead latents of the agreed code).
Every stage reuses what WORK already holds for the same towers (features) and configuration (models).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparc_core import load_checkpoint
from sparc_core.checkpoint import is_checkpoint
from sparc_core.config import TrainConfig
from sparc_core.encoders import load_encoders
from sparc_core.metrics import dead_fraction, empty_share, per_sample_jaccard
from sparc_core.train import train
from sparc_core.worlds.alignment import PAPER, run, world_data
from sparc_core.worlds.scenes import family_of, read_scene_records, write_scenes
from sparc_core.worlds.scenes_eval import (
    STREAMS,
    clip_heatmaps,
    code_scores,
    concept_queries,
    localisation_pairs,
    localisation_table,
    one_attribute_floor,
    readout_scores,
    retrieval_ceiling,
    retrieval_table,
    scene_features,
    sparc_heatmaps,
)
from sparc_core.worlds.synthetic import preset
from sparc_core.worlds.towers import encoders_config, read_towers, train_towers

HELD_OUT = 1000
TOWERS = Path(__file__).resolve().parent / "towers"

# the paper's recipe, then each addition of the defaults alone, then all of them
ADDITIONS = {
    "+ latent revival (re-initialisation)": {"revive_after": 20_000},
    "+ alignment loss, one-stream selection": {"align_coef": 1.0, "alone_select_prob": 0.5},
    "+ calibration (thresholds, soft weight)": {"calibrate_rounds": 3},
    "+ relative floor": {"min_rel_activation": 0.2},
    "+ private dictionaries": {"private_latents": 256},
    "+ pruning": {"prune_unused": True},
}
CONFIGS: dict[str, dict[str, Any]] = {
    "paper recipe": PAPER,
    **{name: PAPER | over for name, over in ADDITIONS.items()},
    "defaults (all)": {},
}


def stage(name: str) -> float:
    print(f"== {name}", flush=True)
    return time.perf_counter()


def fingerprint(what: Any) -> str:
    """A short digest of what decides a cached artefact: a towers report (the bytes of its weights, wherever
    they lie) or a configuration."""
    h = hashlib.sha256()
    if isinstance(what, dict) and "dino_weights" in what:
        for key in ("dino_weights", "clip_weights"):
            w = Path(what[key])
            for f in sorted(w.rglob("*")) if w.is_dir() else [w]:
                if f.is_file():
                    h.update(f.read_bytes())
    else:
        h.update(json.dumps(what, sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


def towers_for(family: str, scenes: Path, work: Path, towers: Path) -> dict[str, Any]:
    """The family's towers under ``towers`` (the committed ones by default), else trained into WORK."""
    if (towers / family / "towers.json").is_file():
        return read_towers(towers / family)
    if not (work / "towers" / "towers.json").is_file():
        train_towers(scenes, work / "towers", n_test=HELD_OUT)
    return read_towers(work / "towers")


def code_row(model: Any, test: dict[str, np.ndarray]) -> dict[str, float]:
    """One-stream agreement of caption and DINO codes, and the dictionary's dead share on held-out DINO."""
    agreed = {s: model.encode({s: torch.from_numpy(test[s])}, code="agreed") for s in ("clip_txt", "dino")}
    served = {s: model.encode({s: torch.from_numpy(test[s])}).to_dense() for s in ("clip_txt", "dino")}
    scores = code_scores(served["clip_txt"], served["dino"])
    rank = (scores > np.diag(scores)[:, None]).sum(1)  # images scored above the caption's own image
    return {
        "pair R@10": float(np.mean(rank < 10)),  # what a validation split of paired rows sees, no label
        "jaccard": per_sample_jaccard(agreed["clip_txt"], agreed["dino"]),
        "empty": max(empty_share(c) for c in agreed.values()),
        "dead": dead_fraction(agreed["dino"]),
    }


def scene_family(family: str, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) / family
    work.mkdir(parents=True, exist_ok=True)
    t = stage(f"{family}: scenes, towers, features")
    scenes = work / "scenes"
    if not (scenes / "scenes.jsonl").is_file():
        write_scenes(scenes, args.n, seed=0, family=family, workers=0)
    fam = family_of(scenes)
    records = read_scene_records(scenes)
    n_train = len(records) - HELD_OUT
    towers = towers_for(family, scenes, work, Path(args.towers))
    probe = towers.get("dino_linear_probe_auroc")
    print(f"   towers: DINO-layout linear probe AUROC {'–' if probe is None else f'{probe:.3f}'}; "
          f"CLIP-layout zero-shot top-1 {towers['clip_zero_shot_top1']:.3f} over {towers['clip_zero_shot_classes']} "
          f"classes (chance {1 / towers['clip_zero_shot_classes']:.3f}) {towers.get('note', '')}", flush=True)  # fmt: skip
    enc_cfg = encoders_config(towers)
    work = work / f"towers-{fingerprint(towers)}"  # features and models of other towers are never reused
    work.mkdir(exist_ok=True)
    split = scene_features(scenes, enc_cfg, work, n_train)
    test, test_records = split["test"], records[n_train:]
    encoders = load_encoders(enc_cfg)
    clip_txt = encoders["clip_txt"]
    queries = concept_queries(test_records, fam)
    pairs = localisation_pairs(scenes, test_records, {s: encoders[s] for s in ("dino", "clip_img")}, args.pairs, fam)
    out: dict[str, Any] = {"towers": {k: towers.get(k) for k in ("dino_linear_probe_auroc", "clip_zero_shot_top1")},
                           "queries": len(queries), "pairs": len(pairs), "features_s": time.perf_counter() - t}  # fmt: skip

    t = stage(f"{family}: baselines (no SAE)")
    raw = lambda texts: code_scores(clip_txt.encode_texts(texts), torch.from_numpy(test["clip_img"]))  # noqa: E731
    out["raw CLIP"] = retrieval_table(raw, queries)
    out["ceiling"] = retrieval_ceiling(queries)
    out["floors"] = floors(test_records, fam)
    for stream in ("dino", "clip_img"):  # what each tower's features allow, read with the labels
        scores = readout_scores(split["train"][stream], records[:n_train], test[stream], test_records)
        out[f"{stream} read-out"] = retrieval_table(lambda texts, s=scores: s, queries)
    any_model = None
    rows: dict[str, dict[str, Any]] = {}
    for name, over in CONFIGS.items():
        t = stage(f"{family}: train and measure '{name}'")
        slug = name.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
        ckpt = work / "models" / f"{slug}-{fingerprint({'over': over, 'steps': args.steps})}"  # a changed config retrains
        if not is_checkpoint(ckpt):
            cfg = TrainConfig(
                features={s: str(work / "train" / f"{s}.npy") for s in STREAMS}, out=str(ckpt), steps=args.steps,
                eval_every=10**9, val_rows=0, save_every=args.steps, progress=False, **over,
            )  # fmt: skip
            train(cfg)
        model = load_checkpoint(ckpt)
        any_model = any_model or model

        def sparse(texts: list[str], model: Any = model) -> np.ndarray:
            q = model.encode({"clip_txt": clip_txt.encode_texts(texts)}).to_dense()
            return code_scores(q, model.encode({"dino": torch.from_numpy(test["dino"])}).to_dense())

        row = {"retrieval": retrieval_table(sparse, queries), **code_row(model, test)}
        row["localisation"] = localisation_table(scenes, pairs, "dino", sparc_heatmaps(model, encoders["dino"], clip_txt))
        rows[name] = row
        _print_row(name, row)
    out["configs"] = rows
    t = stage(f"{family}: CLIP's own maps on the same pairs")
    for label, method, options in (
        ("CLIP image-text relevance, every block", "clip-relevance", {}),
        ("CLIP image-text relevance, last block", "clip-relevance", {"start_layer": -1}),
        ("CLIP patch-text cosine", "clip-cosine", {}),
    ):
        hm = clip_heatmaps(any_model, encoders["clip_img"], clip_txt, method, **options)
        out[label] = localisation_table(scenes, pairs, "clip_img", hm)
        v = out[label]
        print(f"   {label:<44} pointing {v['pointing']:.3f}  mIoU {v['iou']:.3f}  mask AP@0.2 {v['mask_AP@0.2']:.3f}")
    r = out["raw CLIP"]
    print(f"   raw CLIP text -> CLIP image: P@10 {r['P@10']:.3f}  mAP {r['mAP']:.3f}  ({r['queries']} queries)")
    for stream, tower in (("dino", "DINO"), ("clip_img", "CLIP image")):
        r = out[f"{stream} read-out"]
        print(f"   {tower} features read by a linear classifier per query trained with the labels (what the tower "
              f"allows, no SPARC): P@10 {r['P@10']:.3f}  mAP {r['mAP']:.3f}")  # fmt: skip
    print(f"   ceiling (every relevant image first): P@10 {out['ceiling']['P@10']:.3f}  mAP 1.000; pointing 1.000")
    print_floors(out["floors"])
    return out


def floors(records: list[dict], fam: Any) -> dict[str, dict[str, float]]:
    """What a ranker that sees the query's colour alone, or its shape alone, reaches on the same queries."""
    return {a: one_attribute_floor(records, fam, a) for a in ("colour", "shape")}


def print_floors(f: dict[str, dict[str, float]]) -> None:
    for a, v in f.items():
        print(f"   {a} alone (scenes ranked by how many objects have the query's {a}; ties random): "
              f"P@10 {v['P@10']:.3f}  mAP {v['mAP']:.3f}")  # fmt: skip


def floors_only(args: argparse.Namespace) -> dict[str, Any]:
    """The ceiling and the one-attribute floors of each family's held-out scenes (no tower, no training)."""
    out = {}
    for family in (f for f in args.families.split(",") if f):
        scenes = Path(args.work) / family / "scenes"
        if not (scenes / "scenes.jsonl").is_file():
            write_scenes(scenes, args.n, seed=0, family=family, workers=0)
        fam, records = family_of(scenes), read_scene_records(scenes)
        test_records = records[len(records) - HELD_OUT :]
        queries = concept_queries(test_records, fam)
        out[family] = {"ceiling": retrieval_ceiling(queries), "floors": floors(test_records, fam)}
        print(f"{family}: {len(queries)} queries over {HELD_OUT} held-out scenes; ceiling P@10 "
              f"{out[family]['ceiling']['P@10']:.3f}, mAP 1.000")  # fmt: skip
        print_floors(out[family]["floors"])
    return out


def _print_row(name: str, row: dict[str, Any]) -> None:
    r, loc = row["retrieval"], row["localisation"]
    print(
        f"   {name:<44} P@10 {r['P@10']:.3f}  mAP {r['mAP']:.3f} | pointing {loc['pointing']:.3f}  mIoU {loc['iou']:.3f}"
        f"  mask AP@0.2 {loc['mask_AP@0.2']:.3f}  detected {loc['detected']:.2f} | paired R@10 {row['pair R@10']:.3f}"
        f"  Jaccard {row['jaccard']:.3f}"
        f" (empty {row['empty']:.2f})  dead {row['dead']:.2f}",
        flush=True,
    )


def planted(args: argparse.Namespace) -> dict[str, Any]:
    """The same configurations on a planted world whose concepts outnumber the latents 2x."""
    dims = {"dino": 256, "clip_img": 192, "clip_txt": 192}
    world = preset("groups", n_concepts=1024, streams=dims, n_train=16_000, n_eval=2_000, seed=11)
    work = Path(args.work) / "planted"
    data = world_data(world, work / "data")
    out = {}
    for name, over in CONFIGS.items():
        stage(f"planted: '{name}'")
        base = {"n_latents": 512, "k": 32, "steps": args.planted_steps, "batch_size": 256}
        slug = name.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
        # a changed configuration trains again; an unchanged one is measured from its checkpoint
        row = run(world, base | over, work / f"{slug}-{fingerprint(base | over)}", data=data, reuse=True)
        out[name] = row
        print(
            f"   {name:<44} text->DINO R@1 served {row['clip_txt->dino latent']['R@1']:.3f} "
            f"(oracle {row['clip_txt->dino oracle R@1']:.3f})  Jaccard/ceiling {row['jaccard_vs_ceiling']:.3f}  "
            f"dead agreed {row['dead']['dino']:.3f}",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="shapes,glyphs")
    ap.add_argument("--work", default="runs/pixels")
    ap.add_argument("--n", type=int, default=12_000, help="scenes per family (the last 1,000 held out)")
    ap.add_argument("--steps", type=int, default=2000, help="SPARC training steps of every configuration")
    ap.add_argument("--planted-steps", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=300, help="(image, class) pairs of the localisation tables")
    ap.add_argument("--configs", help="the configurations to run, separated by semicolons (names hold commas)")
    ap.add_argument("--towers", default=str(TOWERS), help="a folder of towers folders, one per family")
    ap.add_argument(
        "--add-config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="one more configuration: training settings over the defaults, e.g. 'x={\"align_coef\": 0}'",
    )
    ap.add_argument("--no-planted", action="store_true")
    ap.add_argument("--floors-only", action="store_true", help="print the ceiling and the colour / shape floors, then stop")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    if args.configs:
        keep = [c.strip() for c in args.configs.split(";")]
        for name in list(CONFIGS):
            if name not in keep:
                del CONFIGS[name]
    for spec in args.add_config:
        name, _, over = spec.partition("=")
        CONFIGS[name] = json.loads(over)
    if args.floors_only:
        out = floors_only(args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return
    out = {f: scene_family(f, args) for f in args.families.split(",") if f}
    if not args.no_planted:
        out["planted"] = planted(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
