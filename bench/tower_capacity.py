"""How fast the CLIP-layout image tower can learn shape at all: a supervised probe of its capacity.

The towers' CLIP image tower (open_clip ViT, ``TowerSizes``) is trained here with the labels a contrastive
run never has: which shapes each scene holds (multi-label), from scratch, on the family's training scenes,
with random shifts and flips. Its held-out single-object shape top-1 is an upper bound on what the same
number of contrastive steps can give the tower: if supervision cannot teach shape in N steps, neither can
captions. A CLIP ModifiedResNet (the RN50 layout scaled down) is trained beside it on the same batches.

    python bench/tower_capacity.py --scenes runs/px/shapes/scenes --steps 400,3000 [--archs vit,resnet]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparc_core.worlds.scenes import family_of, read_scene_records
from sparc_core.worlds.towers import CLIP_MEAN, CLIP_STD, TowerSizes, _lr, _normalised, clip_model, load_pixels


def image_tower(arch: str, sizes: TowerSizes) -> torch.nn.Module:
    if arch == "vit":
        return clip_model(sizes).visual
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=(1, 1, 1, 1), output_dim=sizes.embed_dim, heads=2, image_size=sizes.image_size, width=16)


def run(arch: str, steps: int, px, y, px_test, truth_single, single, sizes, lr: float, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tower = image_tower(arch, sizes)
    head = torch.nn.Linear(sizes.embed_dim, y.shape[1])
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        rows = torch.randint(0, len(px), (128,), generator=g)
        dx, dy = torch.randint(-40, 41, (2,), generator=g).tolist()
        x = torch.roll(px[rows], (dy, dx), (2, 3))
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        loss = F.binary_cross_entropy_with_logits(head(tower(_normalised(x, CLIP_MEAN, CLIP_STD))), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tower.eval()
    with torch.no_grad():
        scores = torch.cat([head(tower(_normalised(b, CLIP_MEAN, CLIP_STD))) for b in px_test[single].split(256)])
    top1 = float((scores.argmax(1) == truth_single).float().mean())
    tail = losses[-max(1, steps // 10) :]
    return {"top1": top1, "s": time.perf_counter() - t0, "loss": sum(tail) / len(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", required=True, help="a `sparc scenes` folder (the last 1,000 scenes are held out)")
    ap.add_argument("--steps", default="400,3000")
    ap.add_argument("--archs", default="vit,resnet")
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args()
    scenes = Path(args.scenes)
    records, family = read_scene_records(scenes), family_of(scenes)
    n_train = len(records) - 1000
    sizes = TowerSizes()
    ids = [r["id"] for r in records]
    px, px_test = load_pixels(scenes, ids[:n_train], sizes.image_size), load_pixels(scenes, ids[n_train:], sizes.image_size)
    shapes = list(family.shapes)
    y = torch.zeros(n_train, len(shapes))
    for i, r in enumerate(records[:n_train]):
        for o in r["objects"]:
            y[i, shapes.index(o["shape"])] = 1
    single = [j for j in range(1000) if len(records[n_train + j]["objects"]) == 1]
    truth = torch.tensor([shapes.index(records[n_train + j]["objects"][0]["shape"]) for j in single])
    base = 1 / len(shapes)
    print(f"{family.name}: {n_train} training scenes; held-out single-object scenes {len(single)}; chance {base:.3f}")
    print("| image tower | supervised steps (128 scenes) | train s | last-10% loss | held-out shape top-1 |")
    print("|---|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        for arch in args.archs.split(","):
            r = run(arch, steps, px, y, px_test, truth, single, sizes, args.lr)
            name = {"vit": "CLIP ViT (the towers' layout)", "resnet": "CLIP ModifiedResNet"}[arch]
            print(f"| {name} | {steps} | {r['s']:.0f} | {r['loss']:.3f} | {r['top1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
