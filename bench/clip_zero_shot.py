"""Zero-shot of CLIP-layout towers on scenes none of them trained on, split into what it gets wrong.

Each towers folder (as ``sparc towers`` writes it) is loaded from its open_clip directory and scored on the
last ``--held-out`` scenes of each scenes folder, single-object scenes only, over the family's colour x shape
classes ("a red triangle"): top-1 of the 64-way choice, and the colour and the shape of the chosen class
read separately (chance 1/8 each), so a table says whether a tower fails at colour or at shape. Every tower
is scored on the same images with the same prompts; pass scene folders that no listed tower trained on
(``towers.json`` says how many training scenes each saw; the folders' seeds must differ from the training
ones, or only their held-out tail may be used).

    python bench/clip_zero_shot.py --towers bench/towers/shapes runs/towers48/shapes \
        --scenes runs/px/shapes/scenes runs/px/shapes48/scenes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from sparc_core.extras import require
from sparc_core.worlds.scenes import family_of, read_scene_records
from sparc_core.worlds.towers import CLIP_MEAN, CLIP_STD, _normalised, encoders_config, load_pixels, read_towers


def load_clip_tower(towers: Path) -> tuple[torch.nn.Module, int, int]:
    """(model, image size, context length) of a towers folder's CLIP tower, loaded by the real loaders."""
    from sparc_core.encoders import load_encoders

    report = read_towers(towers)
    model = load_encoders(encoders_config(report))["clip_img"].clip.model.eval()
    return model, report["image_size"], model.context_length


@torch.no_grad()
def score(model: torch.nn.Module, size: int, context: int, scenes: Path, held_out: int) -> dict[str, float]:
    open_clip = require("open_clip", "encoders", "the scene towers")
    records, family = read_scene_records(scenes), family_of(scenes)
    rows = [i for i in range(max(0, len(records) - held_out), len(records)) if len(records[i]["objects"]) == 1]
    objects = [records[i]["objects"][0] for i in rows]
    pixels = load_pixels(scenes, [records[i]["id"] for i in rows], size)
    classes = [(c, s) for c in family.colours for s in family.shapes]
    prompts = open_clip.tokenize([family.phrase(c, s) for c, s in classes], context_length=context)
    txt = F.normalize(model.encode_text(prompts), dim=-1)
    img = torch.cat([F.normalize(model.encode_image(_normalised(p, CLIP_MEAN, CLIP_STD)), dim=-1) for p in pixels.split(256)])
    chosen = [classes[j] for j in (img @ txt.T).argmax(1).tolist()]
    n = len(objects)
    return {
        "images": n,
        "top1": sum(c == (o["colour"], o["shape"]) for c, o in zip(chosen, objects)) / n,
        "colour": sum(c[0] == o["colour"] for c, o in zip(chosen, objects)) / n,
        "shape": sum(c[1] == o["shape"] for c, o in zip(chosen, objects)) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--towers", nargs="+", type=Path, required=True, help="towers folders (sparc towers --out)")
    ap.add_argument("--scenes", nargs="+", type=Path, required=True, help="scenes folders none of the towers trained on")
    ap.add_argument("--held-out", type=int, default=1000, help="score the last N scenes of each folder (default 1000)")
    args = ap.parse_args()
    print("| towers | training scenes | CLIP steps | scenes | single-object images | top-1 (chance 1/64) | colour (1/8) "
          "| shape (1/8) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for towers in args.towers:
        model, size, context = load_clip_tower(towers)
        report = read_towers(towers)
        total = {"images": 0, "top1": 0.0, "colour": 0.0, "shape": 0.0}
        for scenes in args.scenes:
            r = score(model, size, context, scenes, args.held_out)
            seen = report.get("clip_train_scenes", report.get("train_scenes"))
            print(f"| {towers} | {seen} | {report.get('clip_steps')} | {scenes} | {r['images']} "
                  f"| {r['top1']:.3f} | {r['colour']:.3f} | {r['shape']:.3f} |")  # fmt: skip
            total["images"] += r["images"]
            for k in ("top1", "colour", "shape"):
                total[k] += r[k] * r["images"]
        n = total["images"]
        mean = {k: total[k] / n for k in ("top1", "colour", "shape")}
        print(f"| {towers} | | | **all** | {n} | **{mean['top1']:.3f}** | {mean['colour']:.3f} | {mean['shape']:.3f} |")


if __name__ == "__main__":
    main()
