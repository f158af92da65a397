"""Items/s of the feature encoders at batch 64, with randomly initialised full-size models.

The models are saved to a temp directory in their real checkpoint layouts (open_clip ViT-B-32 as a
model directory, DINOv2 ViT-B/14 with registers in the official .pth layout) and loaded through
sparc_core.encoders, exactly as real weights are. Rows:
  - clip_img / dino: preprocessed pixels -> features (the model alone);
  - clip_txt: captions -> features (tokeniser included);
  - sparc extract: the whole pipeline on generated JPEGs (decode + both transforms in DataLoader
    workers, all three streams, chunk files, final assembly).

    python bench/encoder_throughput.py                 # CPU, batch 64, fp32 and bf16
    python bench/encoder_throughput.py --device cuda --images 4096
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparc_core.config import ClipConfig, DinoConfig, EncodersConfig, ExtractConfig
from sparc_core.encoders import load_encoders
from sparc_core.encoders.tiny import FULL_DINO_ARCH, write_full_size
from sparc_core.extract import extract


def timed(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--images", type=int, default=256, help="generated images for the whole-pipeline row")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (CUDA), auto")
    args = p.parse_args()
    bs = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        clip_dir, dino_file = write_full_size(d)
        enc_cfg = EncodersConfig(
            clip=ClipConfig(weights=str(clip_dir)),
            dino=DinoConfig(model=FULL_DINO_ARCH, weights=str(dino_file)),
            device=args.device,
        )
        rng = np.random.default_rng(0)
        images = [Image.fromarray((rng.random((256, 320, 3)) * 255).astype(np.uint8)) for _ in range(bs)]
        captions = [f"a photo of a {['red', 'big'][i % 2]} dog on a sunny beach near the sea, number {i}" for i in range(bs)]
        rows = []
        for precision in args.precision.split(","):
            enc = load_encoders(enc_cfg.model_copy(update={"precision": precision}))
            device = enc["dino"].device
            for s in ("clip_img", "dino"):
                px = torch.stack([enc[s].preprocess(im) for im in images])
                sec = timed(lambda e=enc[s], px=px: e.encode_pixels(px), args.reps, device)
                rows.append((s, enc[s].name, precision, bs / sec))
            sec = timed(lambda e=enc["clip_txt"]: e.encode_texts(captions), args.reps, device)
            rows.append(("clip_txt", enc["clip_txt"].name, precision, bs / sec))
        enc = load_encoders(enc_cfg)

        img_dir = d / "images"
        img_dir.mkdir()
        with open(d / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_path", "caption"])
            for i in range(args.images):
                images[i % bs].save(img_dir / f"{i}.jpg", quality=90)
                w.writerow([f"{i}.jpg", captions[i % bs]])
        cfg = ExtractConfig(
            images=str(img_dir), captions=str(d / "captions.csv"), out=str(d / "out"), encoders=enc_cfg,
            batch_size=bs, workers=args.workers, progress=False,
        )  # fmt: skip
        t0 = time.perf_counter()
        extract(cfg, encoders=enc)
        what = f"{args.images} JPEG 320x256, {args.workers} workers"
        rows.append(("sparc extract (3 streams)", what, enc_cfg.precision, args.images / (time.perf_counter() - t0)))

    print(f"device {device}, threads {torch.get_num_threads()}, batch {bs}, random weights")
    print(f"| {'stream':<26} | {'model':<34} | {'precision':<9} | {'items/s':>8} |")
    print(f"|{'-' * 28}|{'-' * 36}|{'-' * 11}|{'-' * 10}|")
    for s, name, precision, ips in rows:
        print(f"| {s:<26} | {name:<34} | {precision:<9} | {ips:8.1f} |")


if __name__ == "__main__":
    main()
