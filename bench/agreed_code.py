"""What keeps latents out of the agreed code on the ViT-L planted worlds: rare latents, pruning, calibration rows.

Takes the models an earlier ``bench/alignment.py --work DIR`` run trained (config ``defaults``) and measures
each on its world's 5,000 held-out samples, as ``bench/alignment.py`` does, after one change at a time:

- pruning on the agreed code too (what training does now at the end): latents that, in their best stream,
  are in the agreed code less than ``below`` x as often as the mean latent are dropped, and the thresholds
  of the rest are fitted again, at several ``below`` (training's default is ``prune_below``, 0.05);
- calibration on N training rows (rows the model was trained on) against N fresh rows of the same world
  (rows it never saw): whether thresholds fitted on rows the model knows explain the dead latents above
  the sampling floor.

    python bench/alignment.py --work runs/vitl/work --worlds few-vitl,open-vitl --configs defaults --no-ablations
    python bench/agreed_code.py --work runs/vitl/work [--below 0.05,0.1,0.2] [--rows 10000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from sparc_core.calibrate import calibrate
from sparc_core.checkpoint import load_checkpoint
from sparc_core.metrics import encode_alone
from sparc_core.train import kept_by_rate
from sparc_core.worlds.alignment import WORLDS, measure, world_data
from sparc_core.worlds.synthetic import PlantedConcepts, preset

HEADER = (
    "| world | change | latents kept | dead %, worst stream: agreed held-out (sampling floor; never on training rows)"
    " | served txt→DINO R@1 | txt→CLIP-image R@1 | Jaccard / ceiling | soft weight |\n|---|---|---|---|---|---|---|---|"
)


def fires(model, feats: dict[str, np.ndarray], code: str) -> torch.Tensor:
    """[streams, latents] how often each latent is in the stream's ``code`` on ``feats``, each stream alone."""
    codes = encode_alone(model, feats, code=code)
    return torch.stack([torch.bincount(c.indices[c.active], minlength=model.n_latents) for c in codes.values()])


def fmt(world: str, change: str, model, r: dict, n0: int) -> str:
    dead = max(r["dead"].values()) * 100
    floor, never = max(r["dead_sampling"].values()) * 100, max(r["dead_train"].values()) * 100
    return (
        f"| {world} | {change} | {model.n_latents}/{n0} | {dead:.1f} ({floor:.1f}; {never:.1f}) "
        f"| {r['clip_txt->dino latent']['R@1']:.3f} | {r['clip_txt->clip_img latent']['R@1']:.3f} "
        f"| {r['jaccard_vs_ceiling']:.3f} | {r['soft_weight']:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="the --work folder of a bench/alignment.py run")
    ap.add_argument("--worlds", default="few-vitl,open-vitl")
    ap.add_argument("--below", default="0.05,0.1,0.2", help="agreed-code pruning thresholds to try")
    ap.add_argument("--rows", type=int, default=10_000, help="rows of the calibration-rows comparison")
    args = ap.parse_args()
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    for name in args.worlds.split(","):
        base, over, _, dims, n_train, _ = WORLDS[name]
        world = preset(base, **over, streams=dims, n_train=n_train, n_eval=5000)
        data = world_data(world, Path(args.work) / name / "data")
        train = {s: np.asarray(np.load(p, mmap_mode="r"), dtype=np.float32) for s, p in data["train"].items()}
        fresh, _ = PlantedConcepts(world).sample(args.rows, seed=3)  # the world files use 1 and 2

        def load(name: str = name) -> tuple:
            model = load_checkpoint(Path(args.work) / name / "defaults" / "model")
            return model.eval(), model.n_latents

        model, n0 = load()
        print(fmt(name, "as trained", model, measure(model, data), n0), flush=True)
        for below in (float(b) for b in args.below.split(",") if b):
            model, n0 = load()
            keep = kept_by_rate(fires(model, train, "search"), below) & kept_by_rate(fires(model, train, "agreed"), below)
            model.keep_latents(keep.nonzero().flatten())
            calibrate(model, train)
            print(fmt(name, f"pruned on the agreed code, below {below:g}, recalibrated", model, measure(model, data), n0),
                  flush=True)  # fmt: skip
        for label, rows in (
            (f"recalibrated on {args.rows:,} training rows", {s: x[: args.rows] for s, x in train.items()}),
            (f"recalibrated on {args.rows:,} unseen rows", fresh),
        ):
            model, n0 = load()
            calibrate(model, rows)
            print(fmt(name, label, model, measure(model, data), n0), flush=True)
    print(f"\n{(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
