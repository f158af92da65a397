"""Training steps/s: the shipped defaults with sparse kernels, the same with dense decoding, and the paper's recipe.

The first two run the identical training step (Global TopK, self + cross + AuxK + alignment losses, the
private residual dictionary, decoder projection, Adam, renorm) on the same random batches; only the
kernels differ: the dense variant takes the autograd path through the full logits matmul and decodes
with to_dense() @ W_dec. The third is the paper's recipe on the sparse kernels (Global TopK + cross-
reconstruction + AuxK: no alignment loss, no one-stream selection, no floor, no private dictionary), so
the cost of the additions is visible next to the kernel speed-up.

    python bench/train_throughput.py                    # n_latents 8192, k 64, batch 256, 1024/768/768
    python bench/train_throughput.py --steps 5 --n-latents 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparc_core import SparcConfig, SparcModel, TrainConfig
from sparc_core.checkpoint import pick_device
from sparc_core.train import make_optimizer, train_step


class Variant:
    """One model variant with its optimizer, ready to take timed training steps."""

    def __init__(self, sparse: bool, args: argparse.Namespace, device: torch.device, paper: bool = False) -> None:
        self.streams = {"dino": 1024, "clip_img": 768, "clip_txt": 768}
        recipe = {"private_latents": 0, "min_rel_activation": 0.0} if paper else {}
        cfg = SparcConfig(
            streams=self.streams, n_latents=args.n_latents, k=args.k, auxk=args.auxk, sparse_kernels=sparse, **recipe
        )
        self.tcfg = TrainConfig(n_latents=args.n_latents, k=args.k, steps=10**6, align_ramp=0.0, align_coef=0.0 if paper else 1.0)
        self.model = SparcModel(cfg, seed=0).to(device)
        self.opt = make_optimizer(self.model, 1e-3)
        self.device = device
        g = torch.Generator().manual_seed(0)
        self.batches = [
            {s: torch.randn(args.batch_size, d, generator=g).to(device) for s, d in self.streams.items()} for _ in range(2)
        ]
        # A realistic share of dead latents keeps the AuxK path busy in both variants.
        self.dead = {s: (torch.rand(args.n_latents, generator=g) < args.dead_fraction).to(device) for s in self.streams}
        self.alone = None if paper else torch.randint(-1, len(self.streams), (args.batch_size,), generator=g).to(device)
        self.i = 0

    def steps(self, n: int) -> float:
        """Seconds per step over ``n`` steps."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(self.model, self.opt, self.batches[self.i % 2], self.tcfg, 10**5, self.dead, self.alone)
            self.i += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--auxk", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dead-fraction", type=float, default=0.1, help="share of latents marked dead (feeds AuxK)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    variants = {
        "dense decoding (baseline)": Variant(False, args, device),
        "sparse kernels (defaults)": Variant(True, args, device),
        "paper recipe, sparse": Variant(True, args, device, paper=True),
    }
    for v in variants.values():
        v.steps(args.warmup)
    # Rounds alternate the variants so drifts of a shared machine hit all alike; medians over rounds.
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            times[name].append(v.steps(args.steps))
    med = {name: statistics.median(t) for name, t in times.items()}
    d = med["dense decoding (baseline)"]
    print(
        f"device {device}, threads {torch.get_num_threads()}, n_latents {args.n_latents}, k {args.k}, "
        f"auxk {args.auxk}, batch {args.batch_size}, dims 1024/768/768, dead {args.dead_fraction:.0%}, "
        f"{args.rounds} rounds x {args.steps} steps per variant (median of rounds)"
    )
    pairs = zip(times["dense decoding (baseline)"], times["sparse kernels (defaults)"])
    print("per-round speed-ups (defaults): " + ", ".join(f"{a / b:.2f}" for a, b in pairs))
    print(f"{'variant':<28}{'ms/step':>10}{'steps/s':>10}{'speed-up':>10}")
    for name, t in med.items():
        print(f"{name:<28}{t * 1e3:>10.1f}{1 / t:>10.2f}{d / t:>10.2f}")


if __name__ == "__main__":
    main()
