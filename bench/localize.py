"""Seconds per Localize / AttributeText on CPU at real model sizes (random weights in the real layouts).

DINOv2 ViT-B/14 with registers (official .pth layout) at 224 px (16 x 16 patches) and open_clip ViT-B-32
(image and text towers), a SPARC model of 8192 latents, k 64 over their feature sizes. Every call takes a
different image and caption (no repeated query); methods alternate within each round; medians reported. The
whole gRPC path (decode, validation, the model thread) is timed beside the library call.

    python bench/localize.py [--images 8]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sparc_core.encoders.tiny import FULL_DINO_ARCH, write_full_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import torch

    from service.client import SparcClient
    from service.server import SparcServer
    from service.settings import load_settings
    from sparc_core import SparcConfig, SparcModel, save_checkpoint
    from sparc_core.config import ClipConfig, DinoConfig, EncodersConfig
    from sparc_core.encoders import load_encoders
    from sparc_core.explain.attribution import attribute_text, localize, text_target

    with tempfile.TemporaryDirectory(prefix="sparc-loc-") as d:
        d = Path(d)
        clip_dir, dino = write_full_size(d)
        enc_cfg = EncodersConfig(
            clip=ClipConfig(weights=str(clip_dir)), dino=DinoConfig(model=FULL_DINO_ARCH, weights=str(dino)), device="cpu"
        )
        encoders = load_encoders(enc_cfg)
        model = SparcModel(SparcConfig(streams={s: e.dim for s, e in encoders.items()}, n_latents=8192, k=64, auxk=256))
        ckpt = save_checkpoint(model, d / "ckpt")
        rng = np.random.default_rng(0)
        images = [Image.fromarray((rng.random((300, 400, 3)) * 255).astype(np.uint8)) for _ in range(args.images)]
        words = ["dog", "bus", "red", "beach", "cat", "balloons", "tree", "city", "night", "boat", "snow", "child"]
        captions = [" ".join(rng.choice(words, 6)) for _ in range(args.images)]
        n, r = args.images, args.rounds
        print(f"torch threads {torch.get_num_threads()}; {n} distinct images and captions; medians of {r} rounds")
        print("| call | model | seconds (median) |\n|---|---|---|")
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for im, cap in zip(images, captions):
                for stream in ("dino", "clip_img"):
                    for method in ("relevance", "gradcam") + (("clip-sim",) if stream == "clip_img" else ()):
                        t0 = time.perf_counter()
                        target = text_target(model, encoders["clip_txt"], cap)
                        localize(model, encoders[stream], im, target, method=method, text_encoder=encoders["clip_txt"])
                        times.setdefault(f"localize {method}|{stream}", []).append(time.perf_counter() - t0)
                for method in ("grad", "relevance"):
                    t0 = time.perf_counter()
                    attribute_text(model, encoders["clip_txt"], cap, method=method)
                    times.setdefault(f"attribute {method}|clip_txt", []).append(time.perf_counter() - t0)
        names = {"dino": "DINOv2 ViT-B/14-reg4, 224 px", "clip_img": "CLIP ViT-B-32 image", "clip_txt": "CLIP ViT-B-32 text"}
        for key, v in times.items():
            call, stream = key.split("|")
            print(f"| {call} (library) | {names[stream]} | {np.median(v):.3f} |")
        s = load_settings(
            overrides={"checkpoint": str(ckpt), "port": 0, "metrics_port": 0, "encoders": enc_cfg.model_dump()}, environ={}
        )
        srv = SparcServer(s).start()
        try:
            with SparcClient(f"127.0.0.1:{srv.port}") as c:
                grpc_t = []
                for im, cap in zip(images, captions):
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG")
                    t0 = time.perf_counter()
                    hm = c.localize(buf.getvalue(), text=cap, encoder_stream="dino", return_png=True, timeout=120)
                    grpc_t.append(time.perf_counter() - t0)
                    assert hm.grid.shape == (16, 16) and hm.png
            print(f"| Localize over gRPC, relevance + PNG overlay | {names['dino']} | {np.median(grpc_t):.3f} |")
        finally:
            srv.stop(0)


if __name__ == "__main__":
    main()
