"""How fast the CLIP-layout image tower can learn shape at all: a supervised probe of its capacity.

The towers' CLIP image tower (open_clip ViT, ``TowerSizes``) is trained here with the labels a contrastive
run never has: which shapes each scene holds (multi-label), from scratch, on the family's training scenes,
with random shifts and flips. Its held-out single-object shape top-1 is an upper bound on what the same
number of contrastive steps can give the tower: if supervision cannot teach shape in N steps, neither can
captions. A CLIP ModifiedResNet (the RN50 layout scaled down) is trained beside it on the same batches.

    python bench/tower_capacity.py --scenes runs/px/shapes/scenes --steps 400,3000 [--archs vit,resnet]

Variants of the ViT (each a row): ``--vits`` takes ``;``-separated JSON objects over the towers' layout and
this recipe, e.g. ``'{};{"pool_type": "avg"};{"image_size": 64, "patch": 8}'`` (keys: ``lr``, ``shift``,
``image_size``, ``patch``, and any open_clip vision setting such as ``pool_type`` or ``pos_embed_type``);
``--single-only`` trains on the single-object scenes alone (one shape per label set).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparc_core.worlds.scenes import family_of, read_scene_records
from sparc_core.worlds.towers import CLIP_MEAN, CLIP_STD, TowerSizes, _lr, _normalised, clip_model, load_pixels


def image_tower(arch: str, sizes: TowerSizes, vision: dict | None = None) -> torch.nn.Module:
    if arch == "vit":
        if not vision:
            return clip_model(sizes).visual
        import open_clip

        cfg = sizes.clip_cfg()
        cfg["vision_cfg"].update(vision)
        return open_clip.CLIP(**cfg).visual
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=(1, 1, 1, 1), output_dim=sizes.embed_dim, heads=2, image_size=sizes.image_size, width=16)


def run(
    arch: str, steps: int, px, y, px_test, truth_single, single, sizes, lr: float, seed: int = 0, shift: int = 40,
    vision: dict | None = None, pool: torch.Tensor | None = None,
) -> dict:  # fmt: skip
    """Train ``steps`` supervised steps from scratch (rows drawn from ``pool``, default every scene), then score
    held-out single-object shape top-1."""
    torch.manual_seed(seed)
    tower = image_tower(arch, sizes, vision)
    head = torch.nn.Linear(sizes.embed_dim, y.shape[1])
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        drawn = torch.arange(len(px)) if pool is None else pool
        rows = drawn[torch.randint(0, len(drawn), (128,), generator=g)]
        x = px[rows]
        if shift:  # a random shift of the whole batch (wrapping round), as many pixels at most
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
            x = torch.roll(x, (dy, dx), (2, 3))
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
    ap.add_argument("--shift", type=int, default=40, help="random shift of each batch, pixels at most (0: none)")
    ap.add_argument("--vits", help="';'-separated JSON variants of the ViT, one row each (replaces --archs)")
    ap.add_argument("--single-only", action="store_true", help="train on the single-object scenes alone")
    args = ap.parse_args()
    scenes = Path(args.scenes)
    records, family = read_scene_records(scenes), family_of(scenes)
    n_train = len(records) - 1000
    ids = [r["id"] for r in records]
    shapes = list(family.shapes)
    y = torch.zeros(n_train, len(shapes))
    for i, r in enumerate(records[:n_train]):
        for o in r["objects"]:
            y[i, shapes.index(o["shape"])] = 1
    single = [j for j in range(1000) if len(records[n_train + j]["objects"]) == 1]
    truth = torch.tensor([shapes.index(records[n_train + j]["objects"][0]["shape"]) for j in single])
    pool = torch.tensor([i for i in range(n_train) if len(records[i]["objects"]) == 1]) if args.single_only else None
    rows = [("vit", json.loads(v)) for v in args.vits.split(";")] if args.vits else [(a, {}) for a in args.archs.split(",")]
    print(f"{family.name}: {n_train if pool is None else len(pool)} training scenes; held-out single-object scenes "
          f"{len(single)}; chance {1 / len(shapes):.3f}")  # fmt: skip
    print("| image tower | supervised steps (128 scenes) | train s | last-10% loss | held-out shape top-1 |")
    print("|---|---|---|---|---|")
    pixels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for steps in (int(s) for s in args.steps.split(",")):
        for arch, variant in rows:
            v = dict(variant)
            lr, shift = v.pop("lr", args.lr), v.pop("shift", args.shift)
            sizes = TowerSizes(image_size=v.pop("image_size", 112), patch=v.pop("patch", 14))
            if sizes.image_size not in pixels:
                pixels[sizes.image_size] = (
                    load_pixels(scenes, ids[:n_train], sizes.image_size),
                    load_pixels(scenes, ids[n_train:], sizes.image_size),
                )
            px, px_test = pixels[sizes.image_size]
            r = run(arch, steps, px, y, px_test, truth, single, sizes, lr, shift=shift, vision=v, pool=pool)
            name = {"vit": "CLIP ViT (the towers' layout)", "resnet": "CLIP ModifiedResNet"}[arch]
            if variant:
                name += " " + json.dumps(variant)
            print(f"| {name} | {steps} | {r['s']:.0f} | {r['loss']:.3f} | {r['top1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
