"""The whole product on pixels and words: rendered scenes -> trained towers -> extract -> train -> index -> gRPC.

    python bench/scenes.py [--n 20000] [--work runs/scenes] [--json out.json]

1. `sparc scenes`: --n rendered image-caption pairs with masks and labels (the last 1,000 held out);
2. `sparc towers`: a DINOv2-layout ViT by masked image modelling on the images, an open_clip-layout CLIP on the captions;
3. `sparc extract` through the real loaders (official DINOv2 .pth, open_clip directory);
4. `sparc train` on the training scenes: the shipped defaults, the paper's recipe, Local TopK (same budget);
5. `sparc index build` for DINO and CLIP-image over the held-out scenes, `sparc serve` in this process, and
   every single-concept text query ("a red triangle") sent over gRPC against the DINO index;
6. measured against the ground truth (sparc_core.worlds.scenes_eval): text -> DINO retrieval (P@10, mAP) beside
   raw CLIP text -> CLIP image; localisation (pointing game, mIoU, mask AP at IoU 0.2 as the SPARC authors
   score COCO) of SPARC latents on DINO and on CLIP-image beside CLIP's own image-text relevance; caption
   attribution; naming. A picture of one scene's heatmap with the object's mask outlined is written to
   WORK/heatmap.png;
7. `sparc name-latents` with the scene vocabulary and `sparc report`: the concept report (WORK/report).

Every stage reuses what WORK already holds (delete a stage's folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sparc_core import load_checkpoint
from sparc_core.config import EncodersConfig, TrainConfig
from sparc_core.encoders import load_encoders
from sparc_core.train import train
from sparc_core.worlds.alignment import LOCAL, PAPER
from sparc_core.worlds.scenes import family_of, read_scene_records, write_scenes
from sparc_core.worlds.scenes_eval import (
    attribution_table,
    clip_heatmaps,
    code_scores,
    concept_queries,
    localisation_pairs,
    localisation_table,
    mask_in_crop,
    naming_table,
    phrase,
    retrieval_table,
    scene_features,
    sparc_heatmaps,
)
from sparc_core.worlds.towers import encoders_config, read_towers, train_towers

HELD_OUT = 1000
CONFIGS = {"SPARC defaults": {}, "paper recipe": PAPER, "Local TopK": LOCAL}


def stage(name: str) -> float:
    print(f"== {name}", flush=True)
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="scenes (the last 1,000 held out)")
    ap.add_argument("--family", default="shapes", help="scene family (sparc_core.worlds.scenes.FAMILIES)")
    ap.add_argument("--work", default="runs/scenes")
    ap.add_argument("--dino-steps", type=int, default=1000)
    ap.add_argument("--clip-steps", type=int, default=2400)
    ap.add_argument("--sparc-steps", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=300, help="(image, object) pairs per localisation method")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"n": args.n}

    t = stage("1. scenes")
    scenes = work / "scenes"
    if not (scenes / "scenes.jsonl").is_file():
        write_scenes(scenes, args.n, seed=0, family=args.family, workers=0)
    family = family_of(scenes)
    records = read_scene_records(scenes)
    labels = np.load(scenes / "labels.npy")
    n_train = len(records) - HELD_OUT
    out["scenes_s"] = time.perf_counter() - t

    t = stage("2. towers")
    if not (work / "towers" / "towers.json").is_file():
        train_towers(scenes, work / "towers", n_test=HELD_OUT, dino_steps=args.dino_steps, clip_steps=args.clip_steps)
    towers = read_towers(work / "towers")
    out["towers"] = {k: towers[k] for k in ("dino_linear_probe_auroc", "clip_zero_shot_top1", "clip_zero_shot_classes")}
    print(f"   DINO linear probe mean AUROC {towers['dino_linear_probe_auroc']:.3f}; CLIP zero-shot top-1 "
          f"{towers['clip_zero_shot_top1']:.3f} over {towers['clip_zero_shot_classes']} classes", flush=True)  # fmt: skip

    t = stage("3. extract (the real loaders)")
    enc_cfg = encoders_config(towers)
    test = scene_features(scenes, enc_cfg, work, n_train)["test"]
    streams = tuple(test)
    test_records = records[n_train:]
    out["extract_s"] = time.perf_counter() - t

    t = stage("4. train (same budget for every configuration)")
    models = {}
    for name, over in CONFIGS.items():
        ckpt = work / "models" / name.replace(" ", "-")
        if not (ckpt / "CURRENT").is_file():
            cfg = TrainConfig(
                features={s: str(work / "train" / f"{s}.npy") for s in streams},
                labels=str(work / "train" / "labels.npy"), out=str(ckpt), steps=args.sparc_steps,
                eval_every=10**9, val_rows=0, save_every=args.sparc_steps, progress=False, **over,
            )  # fmt: skip
            train(cfg)
        models[name] = load_checkpoint(ckpt)
    out["train_s"] = time.perf_counter() - t

    t = stage("5. retrieval: single-concept text queries")
    encoders = load_encoders(enc_cfg)
    queries = concept_queries(test_records, family)
    clip_txt = encoders["clip_txt"]
    table = {}
    for name, model in models.items():

        def sparse(texts, model=model, code="search"):
            q = model.encode({"clip_txt": clip_txt.encode_texts(texts)}, code=code).to_dense()
            g = model.encode({"dino": torch.from_numpy(test["dino"])}, code=code).to_dense()
            return code_scores(q, g)

        table[f"{name}: text -> DINO, latent cosine"] = retrieval_table(sparse, queries)
    raw = lambda texts: code_scores(clip_txt.encode_texts(texts), torch.from_numpy(test["clip_img"]))  # noqa: E731
    table["raw CLIP: text -> CLIP image"] = retrieval_table(raw, queries)
    table.update(_over_grpc(work, models, enc_cfg, queries, test_records))
    out["retrieval"] = table
    for k, v in table.items():
        ap = f"mAP {v['mAP']:.3f}" if "mAP" in v else f"explained {v['explained']:.2f}"
        print(f"   {k:<55} P@10 {v['P@10']:.3f}  {ap}  ({v['queries']} queries)", flush=True)

    t = stage("6. localisation, per (image, class), every row on the same pairs")
    sparc = models["SPARC defaults"]
    pairs = localisation_pairs(scenes, test_records, {s: encoders[s] for s in ("dino", "clip_img")}, args.pairs, family)
    loc = {}
    for label, stream, heatmap_of in (
        ("SPARC latents on DINO, relevance", "dino", sparc_heatmaps(sparc, encoders["dino"], clip_txt)),
        ("SPARC latents on DINO, relevance from the last block", "dino",
         sparc_heatmaps(sparc, encoders["dino"], clip_txt, start_layer=-1)),
        ("SPARC latents on DINO, joint code similarity", "dino",
         sparc_heatmaps(sparc, encoders["dino"], clip_txt, score="joint")),
        ("SPARC latents on DINO, Grad-CAM", "dino", sparc_heatmaps(sparc, encoders["dino"], clip_txt, "gradcam")),
        ("SPARC latents on CLIP image, relevance", "clip_img", sparc_heatmaps(sparc, encoders["clip_img"], clip_txt)),
        ("paper recipe latents on DINO, relevance", "dino",
         sparc_heatmaps(models["paper recipe"], encoders["dino"], clip_txt)),
        ("CLIP image-text relevance (the paper's baseline)", "clip_img", clip_heatmaps(sparc, encoders["clip_img"], clip_txt)),
        ("CLIP image-text relevance from the last block", "clip_img",
         clip_heatmaps(sparc, encoders["clip_img"], clip_txt, start_layer=-1)),
        ("CLIP patch-text cosine", "clip_img", clip_heatmaps(sparc, encoders["clip_img"], clip_txt, "clip-cosine")),
    ):  # fmt: skip
        loc[label] = localisation_table(scenes, pairs, stream, heatmap_of)
        v = loc[label]
        print(f"   {label:<55} pointing {v['pointing']:.3f}  mIoU {v['iou']:.3f}  IoU>=0.2 {v['iou>=0.2']:.3f}"
              f"  mask AP@0.2 {v['mask_AP@0.2']:.3f}  ({v['pairs']} pairs, detected {v['detected']:.2f})",
              flush=True)  # fmt: skip
    out["localisation"] = loc
    _picture(sparc, encoders, clip_txt, scenes, test_records, family, work / "heatmap.png")

    t = stage("7. caption attribution and naming")
    out["attribution"] = attribution_table(sparc, clip_txt, test_records, family)
    codes = sparc.encode({"dino": torch.from_numpy(test["dino"])}, code="agreed")
    out["naming"] = naming_table(sparc, clip_txt, (codes.indices.numpy(), codes.values.numpy()), labels[n_train:], family)
    print(f"   object words outrank every other word in {out['attribution']['object_word_first']:.3f} of "
          f"{out['attribution']['captions']} captions", flush=True)  # fmt: skip
    print(f"   latents named after the attribute that fires them: {out['naming']['named_right']:.3f} of "
          f"{out['naming']['scored_latents']} (chance {1 / len(family.concepts):.3f})", flush=True)  # fmt: skip
    out["eval_s"] = time.perf_counter() - t

    t = stage("8. named latents and the concept report (sparc name-latents, sparc report)")
    from sparc_core.cli import main as sparc
    from sparc_core.worlds.towers import extract_flags

    flags = extract_flags(towers)
    ckpt = work / "models" / "SPARC-defaults"
    vocab = work / "vocab.txt"
    vocab.write_text("\n".join(family.concepts) + "\n")
    assert sparc(["name-latents", "--checkpoint", str(ckpt), "--vocab", str(vocab), *flags]) == 0
    assert sparc(["report", "--checkpoint", str(ckpt), "--index", f"scenes={work / 'bundles' / 'dino'}",
                  "--captions", str(scenes / "captions.csv"), "--images", str(scenes / "images"),
                  "--max-latents", "40", "--heatmaps", "2", *flags, "--out", str(work / "report")]) == 0  # fmt: skip
    out["report_s"] = time.perf_counter() - t
    print(f"   concept report: {work / 'report' / 'index.html'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def _over_grpc(work: Path, models: dict, enc_cfg: EncodersConfig, queries: list, test_records: list) -> dict:
    """The DINO and CLIP-image bundles served by `sparc serve` in this process; the queries sent over gRPC."""
    from index import build_bundle
    from service.client import SparcClient, make_query, search_request
    from service.server import SparcServer
    from service.settings import load_settings

    ckpt = work / "models" / "SPARC-defaults"
    ids = work / "test" / "ids.txt"
    ids.write_text("".join(r["id"] + "\n" for r in test_records))
    bundles = {}
    for stream in ("dino", "clip_img"):
        b = work / "bundles" / stream
        if not (b / "CURRENT").is_file():
            build_bundle(ckpt, stream, work / "test" / f"{stream}.npy", b, ids=ids, progress=False)
        bundles[f"scenes-{stream}"] = [str(b)]
    settings = load_settings(
        overrides={"checkpoint": str(ckpt), "indexes": bundles, "port": 0, "metrics_port": 0, "encoders": enc_cfg.model_dump()},
        environ={},
    )
    server = SparcServer(settings).start()
    row_of = {r["id"]: i for i, r in enumerate(test_records)}
    try:
        with SparcClient(f"127.0.0.1:{server.port}") as client:
            precision, explained = [], []
            for text, relevant in queries:
                res = client.search(search_request(make_query(text=text), ["scenes-dino"], top_k=10, explain=True))
                hits = [row_of[h.id] for h in res.hits]
                precision.append(float(np.mean([relevant[i] for i in hits])) if hits else 0.0)
                explained.append(float(all(h.explanation for h in res.hits)))
    finally:
        server.stop(0)
    return {
        "SPARC defaults over gRPC: text -> DINO index, top 10": {
            "P@10": float(np.mean(precision)), "queries": len(precision), "explained": float(np.mean(explained)),
        }
    }  # fmt: skip


def _picture(model, encoders, clip_txt, scenes: Path, records: list, family, path: Path) -> None:
    """One held-out scene with two or more objects: the first object's heatmap on DINO, its mask outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from sparc_core.explain.attribution import localize, text_target
    from sparc_core.worlds.scenes import instance_mask

    r = next(r for r in records if len(r["objects"]) >= 2)
    with Image.open(scenes / "images" / f"{r['id']}.png") as im:
        image = im.convert("RGB")
    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    for k, stream in enumerate(("dino", "clip_img")):
        obj = r["objects"][0]
        hm = localize(model, encoders[stream], image, text_target(model, clip_txt, phrase(obj, family)), method="relevance")
        mask = mask_in_crop(instance_mask(scenes, r["id"], 0), encoders[stream])
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(hm.image)
        ax.imshow(hm.upsampled, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.5)
        ax.set_title(f'"{phrase(obj, family)}" on {stream} (SPARC latents, relevance)', fontsize=8, parse_math=False)
        ax.axis("off")
    fig.savefig(path)
    print(f"   heatmap of scene {r['id']} ({phrase(r['objects'][0], family)}, mask outlined in white): {path}", flush=True)


if __name__ == "__main__":
    main()
