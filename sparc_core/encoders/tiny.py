"""Randomly initialised CLIP and DINOv2 models saved in the layouts real checkpoints have: tiny ones (tests)
and full-size ones (``write_full_size``: benchmarks of the encoders at their real cost)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
DINO_ARCH = "vit_small_patch14_reg4_dinov2"
DINO_ARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2}
DINO_SIZE = 28


def _jitter(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random weights with some spread (fresh inits zero out layer scales and tokens)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.2 * torch.randn(v.shape, generator=g)).contiguous() for k, v in sd.items()}


def clip_state(seed: int = 0, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """A tiny open_clip CLIP state dict."""
    import open_clip

    torch.manual_seed(seed)
    sd = open_clip.CLIP(**(cfg or CLIP_CFG)).state_dict()
    return {k: v.contiguous() for k, v in sd.items()}


def without_positions(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with every position embedding zero: patches (and tokens) then differ only by content,
    so a known region or word is the only thing that can drive a latent."""
    return {k: torch.zeros_like(v) if k.endswith(("positional_embedding", "pos_embed")) else v for k, v in sd.items()}


def write_clip_dir(d: Path, seed: int = 0, cfg: dict | None = None, positions: bool = True) -> Path:
    """A model directory as an open_clip hub snapshot has it: open_clip_config.json + open_clip_model.safetensors."""
    d.mkdir(parents=True, exist_ok=True)
    model_cfg = cfg or CLIP_CFG
    full = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}
    (d / "open_clip_config.json").write_text(json.dumps(full))
    sd = clip_state(seed, model_cfg)
    save_file(sd if positions else without_positions(sd), d / "open_clip_model.safetensors")
    return d


def write_clip_file(d: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model-config .json, torch checkpoint .pt) as a user with a custom architecture has them."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "tiny-clip-test.json"
    cfg.write_text(json.dumps(CLIP_CFG))
    weights = d / "tiny_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip_state(seed).items()}}, weights)
    return cfg, weights


def dino_timm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny timm DINOv2-with-registers state dict."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(DINO_ARCH, pretrained=False, num_classes=0, img_size=DINO_SIZE, **DINO_ARGS)
    return _jitter(model.state_dict(), seed)


def write_dino_official(path: Path, seed: int = 0, positions: bool = True) -> Path:
    """The official DINOv2 layout (dinov2_vit*14_reg4_pretrain.pth): register_tokens, mask_token, cls in pos_embed."""
    sd = dino_timm_state(seed)
    sd = sd if positions else without_positions(sd)
    off = {}
    for k, v in sd.items():
        if k == "reg_token":
            off["register_tokens"] = v
        elif k == "pos_embed":  # official: position 0 belongs to the CLS token (timm folds it into cls_token)
            off["pos_embed"] = torch.cat([torch.zeros(1, 1, v.shape[-1]), v], 1)
        else:
            off[k] = v
    off["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(off, path)
    return path


def write_dino_timm_dir(d: Path, seed: int = 0) -> Path:
    """A timm model directory (hub snapshot layout): config.json with architecture + model_args, model.safetensors."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": DINO_ARCH, "num_classes": 0, "model_args": {**DINO_ARGS, "img_size": DINO_SIZE}}
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(dino_timm_state(seed), d / "model.safetensors")
    return d


def write_images(d: Path, n: int, seed: int = 0) -> Path:
    """``n`` small random JPEG/PNG images and captions.csv (image_path, caption, id)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img_{i:04d}.{'png' if i % 3 == 0 else 'jpg'}"
        h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / name)
        rows.append((name, f"a photo of thing {i} with {['red', 'blue', 'green'][i % 3]} light", f"item-{i}"))
    with open(d / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption", "id"])
        w.writerows(rows)
    return d / "captions.csv"


FULL_DINO_ARCH = "vit_base_patch14_reg4_dinov2"  # write_full_size's DINOv2 (ViT-B/14 with registers)


def write_full_size(d: Path) -> tuple[Path, Path]:
    """A random ViT-B-32 open_clip directory and a random DINOv2 ViT-B/14-reg4 in the official layout."""
    import open_clip
    import timm

    clip_dir = d / "clip"
    clip_dir.mkdir()
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    cfg = {"model_name": "ViT-B-32", "model_cfg": open_clip.get_model_config("ViT-B-32"), "preprocess_cfg": {}}
    (clip_dir / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, clip_dir / "open_clip_model.safetensors")
    vit = timm.create_model(FULL_DINO_ARCH, pretrained=False, num_classes=0, img_size=518)
    sd = dict(vit.state_dict())
    sd["register_tokens"] = sd.pop("reg_token")
    sd["pos_embed"] = torch.cat([torch.zeros(1, 1, sd["pos_embed"].shape[-1]), sd["pos_embed"]], 1)
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    torch.save(sd, d / "dinov2_vitb14_reg4_pretrain.pth")
    return clip_dir, d / "dinov2_vitb14_reg4_pretrain.pth"
