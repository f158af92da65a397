"""Named latents scored where the truth is known: planted-concept worlds.

Per world and configuration (the shipped defaults, the paper's recipe), train with the alignment bench's
budget, name every latent from the CLIP-text tower (each planted concept's text vector alone is one
vocabulary entry), then score on 5,000 held-out samples encoded from DINO alone: the fraction of latents
whose top name is the planted concept that fires them there (largest lift). Chance is 1 / n_concepts.

    python bench/naming.py [--worlds groups-0.5x,hierarchy-0.5x,flat-8x] [--steps 800]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sparc_core.checkpoint import load_checkpoint
from sparc_core.explain.naming import name_latents, naming_score
from sparc_core.worlds.alignment import PAPER, WORLDS, run, world_data
from sparc_core.worlds.synthetic import PlantedConcepts, preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="groups-0.5x,hierarchy-0.5x,flat-8x")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--n-train", type=int, default=16_000)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sparc-naming-"))
    print("| world | config | named latents scored | top name = planted concept (DINO codes) | chance |")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    try:
        for name in args.worlds.split(","):
            base, over, latents, dims, _, _ = WORLDS[name]
            world = preset(base, **over, streams=dims, n_train=args.n_train, n_eval=5000)
            n_latents = latents if isinstance(latents, int) else int(latents * world.n_concepts)
            data = world_data(world, work / name / "data")
            names = [f"concept-{c}" for c in range(world.n_concepts)]
            vocab = PlantedConcepts(world).concept_vectors("clip_txt")
            for config, overrides in (("defaults", {}), ("paper", PAPER)):
                out = work / name / config
                run(world, {"n_latents": n_latents, "k": 32, "steps": args.steps} | overrides, out, data)
                model = load_checkpoint(out / "model")
                named = name_latents(model, "clip_txt", vocab, names)
                code = model.encode({"dino": torch.from_numpy(data["eval"]["dino"])})
                s = naming_score(named, code.indices.numpy(), code.values.numpy(), data["eval_labels"], names)
                print(
                    f"| {name} | {config} | {int(s['scored_latents'])} of {model.n_latents} | {s['top1']:.3f} | "
                    f"{1 / world.n_concepts:.4f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{(time.perf_counter() - t0) / 60:.1f} min; {args.steps} steps of 256, k 32")


if __name__ == "__main__":
    main()
