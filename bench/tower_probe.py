"""What DINO-layout towers' features read, by concept group, beside a random tower of the same layout.

    python bench/tower_probe.py --scenes runs/px/shapes/scenes \
        --weights bench/towers/shapes/dino/dinov2_vits14_reg4_scenes.pth other.pth ...

Every tower is loaded through the real loader (`sparc extract --dino-weights`'s) and scored on the same
scenes: a logistic-regression probe of the scene's concept labels from the CLS features (4,000 training
scenes, the last 1,000 held out), and a dense probe of the object under each patch from the patch tokens
(object patches only: which shape / colour / texture, not whether an object is there), each as mean AUROC
per group (chance 0.5). The first row is a random-init tower of the same layout (seed 0): what any ViT
gives without training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparc_core.config import DinoConfig
from sparc_core.encoders.dino import DinoEncoder
from sparc_core.worlds.scenes import family_of, read_scene_records
from sparc_core.worlds.towers import (
    DINO_ARCH,
    DINO_MEAN,
    DINO_STD,
    TowerSizes,
    _normalised,
    dino_model,
    load_pixels,
    probe_aurocs,
)


def patch_labels(scenes: Path, records: list[dict], concepts: list[str], size: int, resize: int, patch: int) -> np.ndarray:
    """[n, patches, concepts]: the concepts of the object covering at least half of each patch (as the
    DINO preprocessing crops the image: resize, then the centre crop)."""
    side = size // patch
    out = np.zeros((len(records), side * side, len(concepts)), np.uint8)
    off = (resize - size) // 2
    for k, r in enumerate(records):
        with Image.open(scenes / "masks" / f"{r['id']}.png") as im:
            owner = np.array(im.resize((resize, resize), Image.NEAREST))[off : off + size, off : off + size]
        cells = owner.reshape(side, patch, side, patch).transpose(0, 2, 1, 3).reshape(side * side, -1)
        for c, cell in enumerate(cells):
            values, counts = np.unique(cell, return_counts=True)
            j = int(values[counts.argmax()])
            if j > 0 and counts.max() * 2 >= cell.size:
                o = r["objects"][j - 1]
                for name in (o["shape"], o["colour"], o["texture"]):
                    out[k, c, concepts.index(name)] = 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", required=True)
    ap.add_argument("--weights", nargs="+", required=True, help="DINO-layout towers in the official DINOv2 layout")
    ap.add_argument("--names", nargs="+", help="a row name per weights file")
    ap.add_argument("--json")
    args = ap.parse_args()
    scenes = Path(args.scenes)
    family, records = family_of(scenes), read_scene_records(scenes)
    labels = np.load(scenes / "labels.npy")
    sizes = TowerSizes()
    resize = sizes.image_size * 256 // 224
    train, test = list(range(4000)), list(range(len(records) - 1000, len(records)))
    ids = [r["id"] for r in records]
    px_train = load_pixels(scenes, [ids[i] for i in train], sizes.image_size, resize)
    px_test = load_pixels(scenes, [ids[i] for i in test], sizes.image_size, resize)
    concepts = family.concepts
    groups = {"shape": list(family.shapes), "colour": list(family.colours), "texture": list(family.textures)}
    dense_train = patch_labels(scenes, [records[i] for i in train[:1500]], concepts, sizes.image_size, resize, sizes.patch)
    dense_test = patch_labels(scenes, [records[i] for i in test[:500]], concepts, sizes.image_size, resize, sizes.patch)
    names = args.names or [Path(w).name for w in args.weights]
    rows: dict[str, dict[str, float]] = {}
    torch.manual_seed(0)
    towers = [("random init (same layout)", dino_model(sizes))]
    for name, path in zip(names, args.weights):
        cfg = DinoConfig(model=DINO_ARCH, weights=path, model_args=sizes.dino_args(), image_size=sizes.image_size)
        towers.append((name, DinoEncoder(cfg, torch.device("cpu"), None).model))  # the real loader
    print(f"{len(records)} {family.name} scenes; CLS probe: 4,000 train / 1,000 held out; dense probe: object patches of "
          f"1,500 / 500 scenes; mean AUROC per group (chance 0.5)")  # fmt: skip
    print("| DINO-layout tower | CLS shape | CLS colour | CLS texture | patch shape | patch colour | patch texture |")
    print("|---|---|---|---|---|---|---|")
    for name, vit in towers:
        vit.eval()
        with torch.no_grad():
            f_train, f_test = (
                torch.cat([vit.forward_features(_normalised(b, DINO_MEAN, DINO_STD)) for b in p.split(256)])
                for p in (px_train, px_test)
            )
        torch.manual_seed(0)
        cls = probe_aurocs(f_train[:, 0], labels[train], f_test[:, 0], labels[test])
        pre, width = vit.num_prefix_tokens, vit.num_features
        a_x, a_y = f_train[:1500, pre:].reshape(-1, width), dense_train.reshape(-1, len(concepts))
        b_x, b_y = f_test[:500, pre:].reshape(-1, width), dense_test.reshape(-1, len(concepts))
        ka, kb = a_y.any(1), b_y.any(1)
        torch.manual_seed(0)
        dense = probe_aurocs(a_x[torch.from_numpy(ka)], a_y[ka], b_x[torch.from_numpy(kb)], b_y[kb])
        row = {}
        for kind, scores in (("CLS", cls), ("patch", dense)):
            for group, members in groups.items():
                row[f"{kind} {group}"] = float(np.nanmean([scores[concepts.index(m)] for m in members]))
        rows[name] = row
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
