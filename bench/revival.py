"""Dead-latent revival on the planted demo world: off, unbounded (to the last step, never gated), the defaults.

    python bench/revival.py [--work runs/revival] [--steps 2000]

The world and model settings of ``sparc demo`` (512 planted concepts, 384 latents): more concepts than latents,
where revival is what keeps the dictionary alive. Each configuration is trained with the same budget on the
same rows and scored on the same 2,000 held-out rows, each stream encoded alone (agreed code): latents active
on DINO, one-stream Jaccard of DINO and caption codes (empty codes count 0), the share of the kept dictionary
in no held-out DINO code, and the revival rounds the survival gate judged (``metrics.jsonl``). The pixel side
of the same question (both scene families) is ``bench/pixels.py`` with ``--add-config``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sparc_core.checkpoint import load_checkpoint, load_train_state
from sparc_core.config import TrainConfig
from sparc_core.metrics import dead_fraction, per_sample_jaccard
from sparc_core.train import METRICS_LOG, train
from sparc_core.worlds.demo import DEMO_MODEL, DEMO_SYNTH
from sparc_core.worlds.synthetic import write_synthetic

CONFIGS = {
    "no revival (AuxK alone)": {"revive_after": None},
    "revival to the last step, never gated": {"revive_min_survival": 0.0, "revive_until": 1.0},
    "defaults (gated, none in the last 20%)": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/revival")
    ap.add_argument("--steps", type=int, default=DEMO_MODEL["steps"])
    args = ap.parse_args()
    work = Path(args.work)
    if not (work / "data" / "synth.json").is_file():
        write_synthetic(DEMO_SYNTH, work / "data")
    streams = list(DEMO_SYNTH.streams)
    feats = {s: str(work / "data" / "train" / f"{s}.npy") for s in streams}
    held = {s: torch.from_numpy(np.load(work / "data" / "eval" / f"{s}.npy")) for s in ("dino", "clip_txt")}
    print(f"{'configuration':<42} {'kept':>5} {'active on DINO':>15} {'Jaccard':>8} {'dead':>6}  revival rounds (alive/judged)")
    for name, over in CONFIGS.items():
        out = work / name.split(" (")[0].replace(" ", "-").replace(",", "")
        t0 = time.perf_counter()
        cfg = TrainConfig(features=feats, out=str(out), progress=False, eval_every=10**9, val_rows=0,
                          **(DEMO_MODEL | {"steps": args.steps, "save_every": args.steps} | over))  # fmt: skip
        train(cfg, overwrite=True)
        model = load_checkpoint(out)
        codes = {s: model.encode({s: x}, code="agreed") for s, x in held.items()}
        dino = codes["dino"]
        active = len(np.unique(dino.indices.numpy()[dino.values.numpy() > 0]))
        rounds = [json.loads(ln) for ln in (out / METRICS_LOG).read_text().splitlines() if '"revival"' in ln]
        stopped = load_train_state(out)[1].get("revival", {}).get("stopped_at")
        shown = ", ".join(f"{r['survived']}/{r['judged']}" for r in rounds[:6]) + (" ..." if len(rounds) > 6 else "")
        print(
            f"{name:<42} {model.n_latents:>5} {active:>15} {per_sample_jaccard(dino, codes['clip_txt']):>8.3f} "
            f"{dead_fraction(dino):>6.3f}  {shown or '-'}{f'; stopped at step {stopped}' if stopped else ''} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
