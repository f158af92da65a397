"""DINOv2 image features (CLS token, optionally patch tokens) through timm, from local weights.

Accepted layouts: the official DINOv2 checkpoint (``dinov2_vitl14_reg4_pretrain.pth``: ``cls_token``,
``register_tokens``, ``mask_token``, ``blocks.N.ls1.gamma``, ...), a timm state dict (.safetensors or .bin),
or a timm model directory (``config.json`` + ``model.safetensors``, as a hub snapshot has it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import DinoConfig
from ..extras import require
from .base import EncoderError, FeatureEncoder, autocast, read_state_dict, weights_path

ENV_WEIGHTS = "SPARC_DINO_WEIGHTS"
_EXPECTED = (
    "--dino-weights PATH: the official DINOv2 .pth (e.g. dinov2_vitl14_reg4_pretrain.pth), a timm "
    ".safetensors/.bin state dict for --dino-model, or a timm model directory with config.json"
)
_DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pth")


def _from_directory(path: Path) -> tuple[str, dict, Path]:
    """(architecture, model_args, weights file) of a timm model directory."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        snapshots = sorted(path.glob("snapshots/*/config.json"))
        if len(snapshots) != 1:
            raise EncoderError(f"{path}: no timm config.json in this directory (expected {_EXPECTED})")
        cfg_file = snapshots[0]
    try:
        cfg = json.loads(cfg_file.read_text())
        arch = cfg["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise EncoderError(f"{cfg_file}: not a timm model config (needs an 'architecture' key)") from None
    for name in _DIR_WEIGHTS:
        if (cfg_file.parent / name).is_file():
            return arch, dict(cfg.get("model_args") or {}), cfg_file.parent / name
    raise EncoderError(f"{cfg_file.parent}: config.json found but none of {list(_DIR_WEIGHTS)} next to it")


class DinoEncoder(FeatureEncoder):
    """DINOv2 CLS-token features (after the final norm, as the official ``x_norm_clstoken``)."""

    modality = "image"

    def __init__(self, cfg: DinoConfig, device: torch.device, dtype: torch.dtype | None) -> None:
        require("timm", "encoders", "DINOv2 encoders")
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        path = weights_path(cfg.weights, ENV_WEIGHTS, "DINOv2", _EXPECTED)
        if path.is_dir():
            arch, model_args, path = _from_directory(path)
        else:
            arch, model_args = cfg.model, {}
        model_args.update(cfg.model_args)
        if not timm.is_model(arch):
            raise EncoderError(f"unknown timm architecture {arch!r} (e.g. vit_large_patch14_reg4_dinov2)")
        model_args["img_size"] = cfg.image_size
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
        except (TypeError, ValueError, AssertionError) as e:
            raise EncoderError(f"cannot build {arch} with {model_args}: {e}") from None
        state = read_state_dict(path)
        try:
            state = checkpoint_filter_fn(state, model)  # official layout -> timm; resamples position embeddings
            missing, unexpected = model.load_state_dict(state, strict=False)
        except (RuntimeError, KeyError, ValueError) as e:
            raise EncoderError(f"{path}: weights do not fit {arch} ({e}); is --dino-model right?") from None
        if missing or unexpected:
            raise EncoderError(
                f"{path}: weights do not fit {arch}: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); is --dino-model right?"
            )
        self.model = model.to(device).eval()
        self.name, self.stream, self.dim = arch, cfg.stream, int(model.num_features)
        self.device, self.dtype, self.weights = device, dtype, path
        self.patch_tokens = cfg.patch_tokens
        mean = model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
        std = model.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
        transforms = require("torchvision.transforms", "encoders", "image encoders")
        self.preprocess = transforms.Compose(
            [
                transforms.Resize(cfg.image_size * 256 // 224, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(cfg.image_size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS [n, dim], patch tokens [n, n_patches, dim]) of a preprocessed batch, float32 on CPU."""
        with autocast(self.device, self.dtype):
            out = self.model.forward_features(pixels.to(self.device, non_blocking=True))
        out = out.float()
        return out[:, 0].cpu(), out[:, self.model.num_prefix_tokens :].cpu()

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens(pixels)[0]
