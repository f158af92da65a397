"""Small vision and CLIP towers trained on rendered scenes, saved in the layouts the real checkpoints have.

Real DINOv2 and CLIP weights cannot be downloaded everywhere; these towers let the whole product (extraction
through the real loaders, training, indexes, localisation) run on features that TRAINED transformers compute
from pixels, where the truth is known (``sparc_core.scenes``):

- a vision-only ViT in the DINOv2-with-registers layout (timm ``vit_small_patch14_reg4_dinov2`` scaled
  down), trained without captions, from image-level labels only (which shapes, colours and textures an
  image holds; the classifier head is dropped), saved as the official DINOv2 checkpoint is
  (``register_tokens``, the CLS position inside ``pos_embed``, ``mask_token``), so ``sparc extract
  --dino-weights`` loads it unchanged;
- a CLIP model in the open_clip layout (ViT image tower, text transformer with open_clip's real BPE
  tokenizer), trained contrastively on the scene captions, saved as an open_clip model directory
  (``open_clip_config.json`` + ``open_clip_model.safetensors``).

Each tower's own quality is measured on held-out scenes: CLIP zero-shot top-1 over the colour x shape classes
of single-object scenes, and a linear probe of the concepts on the DINO-layout CLS features (mean AUROC).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes, atomic_write_json
from .scenes import COLOURS, CONCEPTS, SHAPES, read_scene_records

DINO_ARCH = "vit_small_patch14_reg4_dinov2"
DINO_FILE = "dinov2_vits14_reg4_scenes.pth"  # official layout, like dinov2_vitl14_reg4_pretrain.pth


@dataclass
class TowerSizes:
    """The towers' shapes: small enough to train in minutes on 2 CPU cores."""

    image_size: int = 112  # pixels; a multiple of the patch size
    patch: int = 14
    width: int = 96  # ViT width of both image towers
    depth: int = 4
    heads: int = 3
    text_width: int = 96
    text_depth: int = 3
    text_heads: int = 4
    context_length: int = 32  # caption tokens (open_clip's BPE)
    embed_dim: int = 64  # CLIP's joint space

    def dino_args(self) -> dict[str, int]:
        """timm constructor arguments (what ``sparc extract --dino-model-args`` takes)."""
        return {"embed_dim": self.width, "depth": self.depth, "num_heads": self.heads}

    def clip_cfg(self) -> dict[str, Any]:
        """open_clip's model_cfg."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.depth,
                "width": self.width,
                "patch_size": self.patch,
                "head_width": self.width // self.heads,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_depth,
            },
        }


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_pixels(directory: Path, ids: list[str], size: int, resize: int | None = None) -> torch.Tensor:
    """[n, 3, size, size] uint8 of the scenes' images: resized to ``resize`` (default ``size``), then the
    centre ``size`` crop, as the encoders' own preprocessing does."""
    resize = resize or size
    out = torch.empty(len(ids), 3, size, size, dtype=torch.uint8)
    off = (resize - size) // 2
    for i, sid in enumerate(ids):
        with Image.open(directory / "images" / f"{sid}.png") as im:
            im = im.convert("RGB")
            if im.size != (resize, resize):
                im = im.resize((resize, resize), Image.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(im)[off : off + size, off : off + size]).permute(2, 0, 1)
    return out


def _normalised(x: torch.Tensor, mean: tuple, std: tuple, flip: bool = False) -> torch.Tensor:
    x = x.float().div_(255)
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _lr(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    return lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def dino_model(sizes: TowerSizes) -> torch.nn.Module:
    import timm

    return timm.create_model(DINO_ARCH, pretrained=False, num_classes=0, img_size=sizes.image_size, **sizes.dino_args())


def train_dino(
    pixels: torch.Tensor, labels: np.ndarray, sizes: TowerSizes, steps: int = 800, batch: int = 64, lr: float = 1e-3,
    seed: int = 0, progress: bool = True,
) -> torch.nn.Module:  # fmt: skip
    """The DINO-layout ViT trained from image-level concept labels (multi-label; the head is dropped)."""
    torch.manual_seed(seed)
    vit = dino_model(sizes)
    head = torch.nn.Linear(vit.num_features, labels.shape[1])
    params = [*vit.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    y = torch.from_numpy(labels.astype(np.float32))
    g = torch.Generator().manual_seed(seed)
    vit.train()
    for step in tqdm(range(steps), desc="training the DINO-layout tower", unit="step", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        rows = torch.randint(0, len(pixels), (batch,), generator=g)
        x = _normalised(pixels[rows], DINO_MEAN, DINO_STD, flip=True)
        loss = F.binary_cross_entropy_with_logits(head(vit.forward_features(x)[:, 0]), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return vit.eval()


def clip_model(sizes: TowerSizes) -> torch.nn.Module:
    import open_clip

    return open_clip.CLIP(**sizes.clip_cfg())


def train_clip(
    pixels: torch.Tensor, captions: list[str], sizes: TowerSizes, steps: int = 1500, batch: int = 128, lr: float = 1e-3,
    seed: int = 0, progress: bool = True,
) -> torch.nn.Module:  # fmt: skip
    """The open_clip-layout CLIP trained contrastively on (scene, caption) pairs."""
    import open_clip

    torch.manual_seed(seed)
    model = clip_model(sizes)
    tokens = open_clip.tokenize(captions, context_length=sizes.context_length)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    labels = torch.arange(batch)
    for step in tqdm(range(steps), desc="training the CLIP-layout towers", unit="step", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        rows = torch.randperm(len(pixels), generator=g)[:batch]
        img = F.normalize(model.encode_image(_normalised(pixels[rows], CLIP_MEAN, CLIP_STD)), dim=-1)
        txt = F.normalize(model.encode_text(tokens[rows]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss = (F.cross_entropy(logits, labels[: len(rows)]) + F.cross_entropy(logits.T, labels[: len(rows)])) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def save_dino_official(vit: torch.nn.Module, path: Path) -> Path:
    """The timm ViT's weights in the official DINOv2 layout (what ``dinov2_vit*14_reg4_pretrain.pth`` holds)."""
    off: dict[str, torch.Tensor] = {}
    for k, v in vit.state_dict().items():
        if k == "reg_token":
            off["register_tokens"] = v.clone()
        elif k == "pos_embed":  # official: position 0 belongs to the CLS token (timm keeps none for it)
            off["pos_embed"] = torch.cat([torch.zeros(1, 1, v.shape[-1]), v], 1)
        else:
            off[k] = v.clone()
    off["mask_token"] = torch.zeros(1, off["cls_token"].shape[-1])
    buf = io.BytesIO()
    torch.save(off, buf)  # a plain dict of tensors: loads with torch.load(weights_only=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_clip_dir(model: torch.nn.Module, sizes: TowerSizes, directory: Path) -> Path:
    """An open_clip model directory (as a hub snapshot has it)."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / "open_clip_model.safetensors", save(sd))
    cfg = {
        "model_name": "sparc-scenes-clip",
        "model_cfg": sizes.clip_cfg(),
        "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD},
    }
    atomic_write_json(directory / "open_clip_config.json", cfg)
    return directory


@torch.no_grad()
def clip_zero_shot(model: torch.nn.Module, pixels: torch.Tensor, objects: list[dict], sizes: TowerSizes) -> float:
    """Top-1 over the colour x shape classes ("a red triangle") on single-object scenes."""
    import open_clip

    classes = [(c, s) for c in COLOURS for s in SHAPES]
    prompts = open_clip.tokenize([f"a {c} {s}" for c, s in classes], context_length=sizes.context_length)
    txt = F.normalize(model.encode_text(prompts), dim=-1)
    truth = torch.tensor([classes.index((o["colour"], o["shape"])) for o in objects])
    img = torch.cat([F.normalize(model.encode_image(_normalised(p, CLIP_MEAN, CLIP_STD)), dim=-1) for p in pixels.split(256)])
    return float(((img @ txt.T).argmax(1) == truth).float().mean())


def _auroc(score: np.ndarray, y: np.ndarray) -> float:
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, steps: int = 300) -> float:
    """Mean AUROC over concepts of a logistic-regression probe on frozen features."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    probe = torch.nn.Linear(a.shape[1], train_y.shape[1])
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    y = torch.from_numpy(train_y.astype(np.float32))
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe(a), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = probe(b).numpy()
    return float(np.nanmean([_auroc(scores[:, j], test_y[:, j]) for j in range(test_y.shape[1])]))


def train_towers(
    scenes: str | Path,
    out: str | Path,
    sizes: TowerSizes | None = None,
    n_train: int | None = None,
    n_test: int = 1000,
    dino_steps: int = 800,
    clip_steps: int = 1500,
    progress: bool = True,
) -> dict[str, Any]:
    """Train both towers on a scenes folder (the last ``n_test`` scenes held out) and save them under ``out``;
    returns where they are, the flags ``sparc extract`` needs, and each tower's quality."""
    scenes, out = Path(scenes), Path(out)
    sizes = sizes or TowerSizes()
    records = read_scene_records(scenes)
    labels = np.load(scenes / "labels.npy")
    if len(records) <= n_test:
        raise ValueError(f"{scenes}: {len(records)} scenes, need more than the {n_test} held out")
    train_rows = list(range(min(len(records) - n_test, n_train or len(records))))
    test_rows = list(range(len(records) - n_test, len(records)))
    ids = [r["id"] for r in records]
    t0 = time.perf_counter()
    dino_resize = sizes.image_size * 256 // 224  # DINOv2's preprocessing: resize, then the centre crop
    px = load_pixels(scenes, [ids[i] for i in train_rows], sizes.image_size, dino_resize)
    px_test = load_pixels(scenes, [ids[i] for i in test_rows], sizes.image_size, dino_resize)
    vit = train_dino(px, labels[train_rows], sizes, steps=dino_steps, progress=progress)
    with torch.no_grad():
        probe_rows = train_rows[: min(len(train_rows), 4000)]
        train_x, test_x = (
            torch.cat([vit.forward_features(_normalised(b, DINO_MEAN, DINO_STD))[:, 0] for b in p.split(256)])
            for p in (px[: len(probe_rows)], px_test)
        )
    probe = linear_probe(train_x, labels[probe_rows], test_x, labels[test_rows])
    dino_s = time.perf_counter() - t0
    px = load_pixels(scenes, [ids[i] for i in train_rows], sizes.image_size)  # CLIP: resize to the side, no crop
    px_test = load_pixels(scenes, [ids[i] for i in test_rows], sizes.image_size)
    clip = train_clip(px, [records[i]["caption"] for i in train_rows], sizes, steps=clip_steps, progress=progress)
    clip_s = time.perf_counter() - t0 - dino_s
    single = [j for j, i in enumerate(test_rows) if len(records[i]["objects"]) == 1]
    zero_shot = clip_zero_shot(clip, px_test[single], [records[test_rows[j]]["objects"][0] for j in single], sizes)
    dino_path = save_dino_official(vit, out / "dino" / DINO_FILE)
    clip_dir = save_clip_dir(clip, sizes, out / "clip")
    report = {
        "dino_weights": str(dino_path),
        "dino_model": DINO_ARCH,
        "dino_model_args": sizes.dino_args(),
        "image_size": sizes.image_size,
        "clip_weights": str(clip_dir),
        "dino_linear_probe_auroc": probe,
        "clip_zero_shot_top1": zero_shot,
        "clip_zero_shot_classes": len(COLOURS) * len(SHAPES),
        "clip_zero_shot_images": len(single),
        "concepts": CONCEPTS,
        "train_scenes": len(train_rows),
        "test_scenes": len(test_rows),
        "dino_train_s": dino_s,
        "clip_train_s": clip_s,
    }
    atomic_write_json(out / "towers.json", report)
    return report


def extract_flags(report: dict[str, Any]) -> list[str]:
    """The ``sparc extract`` / ``serve`` / ``localize`` flags that load the saved towers."""
    return [
        "--clip-weights", report["clip_weights"],
        "--dino-model", report["dino_model"],
        "--dino-weights", report["dino_weights"],
        "--dino-model-args", json.dumps(report["dino_model_args"]),
        "--dino-image-size", str(report["image_size"]),
    ]  # fmt: skip
