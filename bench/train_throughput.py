"""Training steps/s of SparcModel with sparse kernels vs the same model with dense decoding.

Both variants run the identical training step (Global TopK, self + cross + AuxK + alignment losses,
decoder projection, Adam, renorm) on the same random batches; only the kernels differ: the dense
variant takes the autograd path through the full logits matmul and decodes with to_dense() @ W_dec.

    python bench/train_throughput.py                    # n_latents 8192, k 64, batch 256, 1024/768/768
    python bench/train_throughput.py --steps 5 --n-latents 2048
"""

from __future__ import annotations

import argparse
import time

import torch

from sparc_core import SparcConfig, SparcModel, TrainConfig
from sparc_core.train import make_optimizer, pick_device, train_step


def measure(sparse: bool, args: argparse.Namespace, device: torch.device) -> float:
    """Mean seconds per training step after warm-up."""
    streams = {"dino": 1024, "clip_img": 768, "clip_txt": 768}
    cfg = SparcConfig(streams=streams, n_latents=args.n_latents, k=args.k, auxk=args.auxk, sparse_kernels=sparse)
    tcfg = TrainConfig(n_latents=args.n_latents, k=args.k, steps=10**6, align_ramp=0.0)
    model = SparcModel(cfg, seed=0).to(device)
    opt = make_optimizer(model, 1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [{s: torch.randn(args.batch_size, d, generator=g).to(device) for s, d in streams.items()} for _ in range(2)]
    # A realistic share of dead latents keeps the AuxK path busy in both variants.
    dead = {s: (torch.rand(args.n_latents, generator=g) < 0.1).to(device) for s in streams}
    solo = torch.randint(-1, len(streams), (args.batch_size,), generator=g).to(device)
    for i in range(args.warmup):
        train_step(model, opt, batches[i % 2], tcfg, 10**5, dead, solo)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        train_step(model, opt, batches[i % 2], tcfg, 10**5, dead, solo)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--auxk", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    dense = measure(False, args, device)
    sparse = measure(True, args, device)
    print(
        f"device {device}, threads {torch.get_num_threads()}, n_latents {args.n_latents}, k {args.k}, "
        f"auxk {args.auxk}, batch {args.batch_size}, dims 1024/768/768, {args.steps} timed steps"
    )
    print(f"{'variant':<26}{'ms/step':>10}{'steps/s':>10}{'speed-up':>10}")
    print(f"{'dense decoding (baseline)':<26}{dense * 1e3:>10.1f}{1 / dense:>10.2f}{1.0:>10.2f}")
    print(f"{'sparse kernels':<26}{sparse * 1e3:>10.1f}{1 / sparse:>10.2f}{dense / sparse:>10.2f}")


if __name__ == "__main__":
    main()
