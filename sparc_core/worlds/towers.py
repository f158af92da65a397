"""Small vision and CLIP towers trained on rendered scenes, saved in the layouts the real checkpoints have.

Real DINOv2 and CLIP weights cannot be downloaded everywhere; these towers let the whole product (extraction
through the real loaders, training, indexes, localisation) run on features that TRAINED transformers compute
from pixels, where the truth is known (``sparc_core.worlds.scenes``):

- a vision-only ViT in the DINOv2-with-registers layout (timm ``vit_small_patch14_reg4_dinov2`` scaled
  down), trained on the images alone (no label and no caption reaches it), by default as MAE trains
  (masked image modelling: the ViT sees a quarter of the patches with its CLS and register tokens, a light
  decoder paints the rest; the decoder is dropped), or as DINO trains (``method="distill"``: a student
  matches an EMA teacher's centred, sharpened output across multi-crop views; the teacher's backbone is
  kept). On the rendered scenes the masked recipe learns in CPU-minutes what self-distillation does not:
  its CLS features tell the objects' colours at AUROC 0.86 where a self-distilled tower's give 0.72 and
  a random ViT's 0.60 (bench/towers/README.md). Either is saved as the official DINOv2 checkpoint is (``register_tokens``, the
  CLS position inside ``pos_embed``, ``mask_token``), so ``sparc extract --dino-weights`` loads it unchanged;
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
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_write_bytes, atomic_write_json
from ..extras import require
from .scenes import SHAPES_FAMILY, SceneFamily, family_of, read_scene_records

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
    clip_layout: str = "vit"  # the CLIP image tower: "vit" (as ViT-B/16) or "resnet" (open_clip's ModifiedResNet, as RN50)
    resnet_width: int = 8  # ModifiedResNet stem width (RN50: 64); layer4 has 32x as many channels
    resnet_layers: tuple[int, int, int, int] = (1, 1, 1, 1)  # bottleneck blocks per stage (RN50: 3, 4, 6, 3)

    def __post_init__(self) -> None:
        if self.clip_layout not in ("vit", "resnet"):
            raise ValueError(f"clip_layout {self.clip_layout!r}: use 'vit' or 'resnet'")

    def dino_args(self) -> dict[str, int]:
        """timm constructor arguments (what ``sparc extract --dino-model-args`` takes)."""
        return {"embed_dim": self.width, "depth": self.depth, "num_heads": self.heads}

    def clip_cfg(self) -> dict[str, Any]:
        """open_clip's model_cfg."""
        vision: dict[str, Any] = {
            "image_size": self.image_size,
            "layers": self.depth,
            "width": self.width,
            "patch_size": self.patch,
            "head_width": self.width // self.heads,
        }
        if self.clip_layout == "resnet":  # a list of stage depths is what makes open_clip build a ModifiedResNet
            vision = {"image_size": self.image_size, "layers": list(self.resnet_layers), "width": self.resnet_width}
            vision["head_width"] = self.resnet_width * 16  # 2 heads in the attention pool
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
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


def load_pixels(directory: Path, ids: list[str], size: int, resize: int | None = None, threads: int = 0) -> torch.Tensor:
    """[n, 3, size, size] uint8 of the scenes' images: resized to ``resize`` (default ``size``), then the
    centre ``size`` crop, as the encoders' own preprocessing does; decoded by ``threads`` threads (0: one per
    CPU; PIL decodes and resizes outside the GIL)."""
    resize = resize or size
    out = torch.empty(len(ids), 3, size, size, dtype=torch.uint8)
    off = (resize - size) // 2

    def one(i: int) -> None:
        with Image.open(directory / "images" / f"{ids[i]}.png") as im:
            im = im.convert("RGB")
            if im.size != (resize, resize):
                im = im.resize((resize, resize), Image.BICUBIC)
            out[i] = torch.from_numpy(np.array(im)[off : off + size, off : off + size]).permute(2, 0, 1)

    threads = min(threads or os.cpu_count() or 1, max(1, len(ids)))
    if threads == 1:
        for i in range(len(ids)):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(ids))))  # list(): an image that fails raises here
    return out


def _normalised(x: torch.Tensor, mean: tuple, std: tuple, flip: bool = False) -> torch.Tensor:
    x = x.float().div_(255)
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    return (x - torch.tensor(mean, device=x.device)[:, None, None]) / torch.tensor(std, device=x.device)[:, None, None]


def _lr(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    return lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps)))


def dino_model(sizes: TowerSizes, dynamic: bool = False) -> torch.nn.Module:
    timm = require("timm", "encoders", "the scene towers")
    extra = {"dynamic_img_size": True} if dynamic else {}  # training sees local crops smaller than image_size
    return timm.create_model(DINO_ARCH, pretrained=False, num_classes=0, img_size=sizes.image_size, **sizes.dino_args(), **extra)


@dataclass
class DistillSettings:
    """Self-distillation as DINO trains (Caron et al. 2021): no label, no caption ever reaches the tower."""

    out_dim: int = 1024  # prototypes of the projection head
    bottleneck: int = 64  # the head's last hidden width before the prototypes
    local_crops: int = 4  # small crops per image, seen by the student only
    local_size: int = 56  # pixels; a multiple of the patch size
    global_scale: tuple[float, float] = (0.4, 1.0)  # share of the image a global crop keeps
    local_scale: tuple[float, float] = (0.08, 0.4)
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # sharpening: the teacher's softmax is colder than the student's
    teacher_temp_start: float = 0.02  # warmed up to teacher_temp over the first 30% of steps
    center_momentum: float = 0.9  # centring: the running mean of the teacher's outputs, subtracted
    ema_start: float = 0.99  # teacher = EMA of the student; momentum rises to 1 along a cosine
    weight_decay: tuple[float, float] = (0.04, 0.2)


class _DinoHead(torch.nn.Module):
    """DINO's projection head: a 3-layer MLP, an l2-normalised bottleneck, weight-normalised prototypes."""

    def __init__(self, width: int, st: DistillSettings) -> None:
        super().__init__()
        hidden = 4 * width
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, st.bottleneck),
        )  # fmt: skip
        self.last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(st.bottleneck, st.out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def _random_crops(x: torch.Tensor, n: int, size: int, scale: tuple[float, float], g: torch.Generator) -> list[torch.Tensor]:
    """``n`` random-resized crops (area share in ``scale``, aspect 3/4..4/3) of each uint8 image, flipped at
    random, with mild brightness / contrast jitter: hue is left alone, since colour is part of what a scene
    shows (DINO's colour jitter and greyscale would teach the tower to ignore it)."""
    b, _, h, w = x.shape
    out = []
    for _ in range(n):
        area = torch.empty(b).uniform_(*scale, generator=g) * h * w
        ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
        cw = (area * ratio).sqrt().clamp(8, w)
        ch = (area / ratio).sqrt().clamp(8, h)
        x0 = torch.rand(b, generator=g) * (w - cw)
        y0 = torch.rand(b, generator=g) * (h - ch)
        # affine grids: one crop box per image, sampled bilinearly to size x size
        theta = torch.zeros(b, 2, 3)
        flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        theta[:, 0, 0] = cw / w * flip
        theta[:, 1, 1] = ch / h
        theta[:, 0, 2] = (2 * x0 + cw) / w - 1
        theta[:, 1, 2] = (2 * y0 + ch) / h - 1
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False).to(x.device)
        crop = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        bright = torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2, generator=g).to(x.device)
        contrast = torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2, generator=g).to(x.device)
        mean = crop.mean(dim=(1, 2, 3), keepdim=True)
        crop = ((crop - mean) * contrast + mean * bright).clamp(0, 1)
        norm = torch.tensor(DINO_MEAN, device=x.device)[:, None, None], torch.tensor(DINO_STD, device=x.device)[:, None, None]
        out.append((crop - norm[0]) / norm[1])
    return out


def train_dino(
    pixels: torch.Tensor, sizes: TowerSizes, steps: int = 3000, batch: int = 64, lr: float = 1e-3, seed: int = 0,
    progress: bool = True, settings: DistillSettings | None = None, on_step: Any = None, device: str = "cpu",
) -> torch.nn.Module:  # fmt: skip
    """The DINO-layout ViT trained by self-distillation on the images alone; returns the EMA teacher's
    backbone (as DINO releases it, on the CPU). ``on_step(step, loss)`` is called every 50 steps; ``device``
    is where it trains (the batches are drawn from the same seed wherever it runs)."""
    st = settings or DistillSettings()
    torch.manual_seed(seed)
    student = dino_model(sizes, dynamic=True)
    teacher = dino_model(sizes, dynamic=True)
    s_head, t_head = _DinoHead(student.num_features, st), _DinoHead(student.num_features, st)
    for m in (student, teacher, s_head, t_head):
        m.to(device)
    pixels = pixels.to(device)
    teacher.load_state_dict(student.state_dict())
    t_head.load_state_dict(s_head.state_dict())
    for p in (*teacher.parameters(), *t_head.parameters()):
        p.requires_grad = False
    params = [p for p in (*student.parameters(), *s_head.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    center = torch.zeros(st.out_dim, device=device)
    g = torch.Generator().manual_seed(seed)
    student.train()
    bar = tqdm(range(steps), desc="training the DINO-layout tower (self-distillation)", unit="step", disable=not progress)
    for step in bar:
        frac = step / max(1, steps - 1)
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = _lr(step, steps, lr)
        opt.param_groups[0]["weight_decay"] = (
            st.weight_decay[1] - (st.weight_decay[1] - st.weight_decay[0]) * (1 + math.cos(math.pi * frac)) / 2
        )
        rows = torch.randint(0, len(pixels), (batch,), generator=g).to(device)
        x = pixels[rows]
        globals_ = _random_crops(x, 2, sizes.image_size, st.global_scale, g)
        locals_ = _random_crops(x, st.local_crops, st.local_size, st.local_scale, g)
        with torch.no_grad():
            t_temp = st.teacher_temp_start + (st.teacher_temp - st.teacher_temp_start) * min(1.0, frac / 0.3)
            t_out = t_head(teacher.forward_features(torch.cat(globals_))[:, 0])
            t_prob = F.softmax((t_out - center) / t_temp, dim=-1).chunk(2)
        s_out = torch.cat([
            s_head(student.forward_features(torch.cat(globals_))[:, 0]),
            s_head(student.forward_features(torch.cat(locals_))[:, 0]),
        ]).div(st.student_temp)  # fmt: skip
        s_logp = F.log_softmax(s_out, dim=-1).chunk(2 + st.local_crops)
        loss, terms = torch.zeros((), device=device), 0
        for i, tp in enumerate(t_prob):
            for j, sl in enumerate(s_logp):
                if i != j:  # never the same view
                    loss = loss - (tp * sl).sum(-1).mean()
                    terms += 1
        loss = loss / terms
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        if step < steps // 20:  # DINO freezes the last layer for the first steps: it stabilises the prototypes
            for p in s_head.last.parameters():
                p.grad = None
        opt.step()
        with torch.no_grad():
            m = 1 - (1 - st.ema_start) * (math.cos(math.pi * frac) + 1) / 2
            for ps, pt in zip((*student.parameters(), *s_head.parameters()), (*teacher.parameters(), *t_head.parameters())):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            center.mul_(st.center_momentum).add_(t_out.mean(0), alpha=1 - st.center_momentum)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if on_step is not None:
                on_step(step, float(loss.detach()))
    plain = dino_model(sizes)  # the saved tower is built as the loaders build it (no dynamic size)
    plain.load_state_dict({k: v.cpu() for k, v in teacher.state_dict().items()})
    return plain.eval()


DINO_METHODS = ("mae", "distill")


@dataclass
class MaskedSettings:
    """Masked image modelling as MAE trains (He et al. 2022): no label, no caption ever reaches the tower."""

    mask_ratio: float = 0.75  # share of the patches the ViT never sees
    crop_scale: tuple[float, float] = (0.5, 1.0)  # share of the image a training crop keeps
    decoder_width: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 2
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)


class _MaskedDecoder(torch.nn.Module):
    """MAE's decoder: the ViT's tokens projected down, a learned token at every hidden patch, position
    embeddings, a few transformer blocks, and a linear map to the patches' pixels."""

    def __init__(self, width: int, patches: int, patch: int, st: MaskedSettings) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        d = st.decoder_width
        self.embed = torch.nn.Linear(width, d)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, d))
        self.pos = torch.nn.Parameter(torch.randn(1, patches, d) * 0.02)
        blocks = [Block(d, st.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(st.decoder_depth)]
        self.blocks = torch.nn.Sequential(*blocks)
        self.norm = torch.nn.LayerNorm(d)
        self.out = torch.nn.Linear(d, 3 * patch * patch)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor, prefix: int) -> torch.Tensor:
        b, n = len(tokens), self.pos.shape[1]
        t = self.embed(tokens)
        grid = self.mask_token.expand(b, n, -1).scatter(1, visible[..., None].expand(-1, -1, t.shape[-1]), t[:, prefix:])
        x = self.blocks(torch.cat([t[:, :prefix], grid + self.pos], 1))
        return self.out(self.norm(x))[:, prefix:]


def train_dino_masked(
    pixels: torch.Tensor, sizes: TowerSizes, steps: int = 2000, batch: int = 128, lr: float = 1.5e-3, seed: int = 0,
    progress: bool = True, settings: MaskedSettings | None = None, on_step: Any = None, device: str = "cpu",
) -> torch.nn.Module:  # fmt: skip
    """The DINO-layout ViT trained by masked image modelling on the images alone: each step the ViT sees a
    random ``1 - mask_ratio`` of a crop's patches (with its CLS and register tokens) and a light decoder
    reconstructs the hidden patches' pixels (mean squared error on them only, colour kept: the targets are
    not normalised per patch, as colour is part of what a scene shows). Returns the ViT (on the CPU, the
    decoder dropped); ``on_step(step, loss)`` every 50 steps."""
    st = settings or MaskedSettings()
    torch.manual_seed(seed)
    vit = dino_model(sizes).to(device)
    side = sizes.image_size // sizes.patch
    n, prefix = side * side, vit.num_prefix_tokens
    keep = max(1, round(n * (1 - st.mask_ratio)))
    decoder = _MaskedDecoder(vit.num_features, n, sizes.patch, st).to(device)
    params = [*vit.parameters(), *decoder.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": st.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=st.betas
    )  # fmt: skip
    pixels = pixels.to(device)
    g = torch.Generator().manual_seed(seed)
    vit.train()
    bar = tqdm(range(steps), desc="training the DINO-layout tower (masked image modelling)", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        rows = torch.randint(0, len(pixels), (batch,), generator=g).to(device)
        x = _random_crops(pixels[rows], 1, sizes.image_size, st.crop_scale, g)[0]
        b = len(x)
        visible = torch.rand(b, n, generator=g).argsort(1)[:, :keep].to(device)
        tokens = torch.gather(vit.patch_embed(x) + vit.pos_embed, 1, visible[..., None].expand(-1, -1, vit.num_features))
        prefix_tokens = [vit.cls_token.expand(b, -1, -1), vit.reg_token.expand(b, -1, -1)]
        encoded = vit.norm(vit.blocks(vit.norm_pre(torch.cat([*prefix_tokens, tokens], 1))))
        predicted = decoder(encoded, visible, prefix)
        target = F.unfold(x, sizes.patch, stride=sizes.patch).transpose(1, 2)  # [b, n, 3 * patch * patch]
        hidden = torch.ones(b, n, dtype=torch.bool, device=device).scatter(1, visible, False)
        loss = ((predicted - target) ** 2).mean(-1)[hidden].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if on_step is not None:
                on_step(step, float(loss.detach()))
    return vit.cpu().eval()


def clip_model(sizes: TowerSizes) -> torch.nn.Module:
    open_clip = require("open_clip", "encoders", "the scene towers")
    return open_clip.CLIP(**sizes.clip_cfg())


def train_clip(
    pixels: torch.Tensor, captions: list[str], sizes: TowerSizes, steps: int = 2400, batch: int = 128, lr: float = 1e-3,
    seed: int = 0, progress: bool = True, on_step: Any = None, device: str = "cpu", on_eval: Any = None,
    eval_every: int = 500,
) -> torch.nn.Module:  # fmt: skip
    """The open_clip-layout CLIP trained contrastively on (scene, caption) pairs, returned on the CPU;
    ``on_step(step, loss)`` is called every 50 steps, ``on_eval(steps_done, model)`` every ``eval_every``
    steps with the model in eval mode; ``device`` is where it trains."""
    open_clip = require("open_clip", "encoders", "the scene towers")
    torch.manual_seed(seed)
    model = clip_model(sizes).to(device)
    pixels = pixels.to(device)
    tokens = open_clip.tokenize(captions, context_length=sizes.context_length).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    labels = torch.arange(batch, device=device)
    for step in tqdm(range(steps), desc="training the CLIP-layout towers", unit="step", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        rows = torch.randperm(len(pixels), generator=g)[:batch].to(device)
        img = F.normalize(model.encode_image(_normalised(pixels[rows], CLIP_MEAN, CLIP_STD)), dim=-1)
        txt = F.normalize(model.encode_text(tokens[rows]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss = (F.cross_entropy(logits, labels[: len(rows)]) + F.cross_entropy(logits.T, labels[: len(rows)])) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step is not None and step % 50 == 0:
            on_step(step, float(loss.detach()))
        if on_eval is not None and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            with torch.no_grad():
                on_eval(step + 1, model)
            model.train()
    return model.cpu().eval()


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


def save_clip_dir(model: torch.nn.Module, sizes: TowerSizes, directory: Path, seen_texts: list[str] | None = None) -> Path:
    """An open_clip model directory (as a hub snapshot has it). With ``seen_texts`` (the training captions),
    the token embeddings of tokens no caption holds are saved as zeros: training never moved them from
    their random start, and zero rows keep a committed copy of the tower a few MB."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if seen_texts is not None:
        open_clip = require("open_clip", "encoders", "the scene towers")
        seen = torch.unique(open_clip.tokenize(seen_texts, context_length=sizes.context_length))
        unseen = torch.ones(len(sd["token_embedding.weight"]), dtype=torch.bool)
        unseen[seen] = False
        sd["token_embedding.weight"][unseen] = 0.0
    atomic_write_bytes(directory / "open_clip_model.safetensors", save(sd))
    cfg = {
        "model_name": "sparc-scenes-clip",
        "model_cfg": sizes.clip_cfg(),
        "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD},
    }
    atomic_write_json(directory / "open_clip_config.json", cfg)
    return directory


@torch.no_grad()
def clip_zero_shot(
    model: torch.nn.Module, pixels: torch.Tensor, objects: list[dict], sizes: TowerSizes,
    family: SceneFamily = SHAPES_FAMILY,
) -> float:  # fmt: skip
    """Top-1 over the family's colour x shape classes ("a red triangle") on single-object scenes."""
    open_clip = require("open_clip", "encoders", "the scene towers")
    classes = [(c, s) for c in family.colours for s in family.shapes]
    prompts = open_clip.tokenize([family.phrase(c, s) for c, s in classes], context_length=sizes.context_length)
    dev = next(model.parameters()).device
    txt = F.normalize(model.encode_text(prompts.to(dev)), dim=-1)
    truth = torch.tensor([classes.index((o["colour"], o["shape"])) for o in objects])
    img = torch.cat(
        [F.normalize(model.encode_image(_normalised(p.to(dev), CLIP_MEAN, CLIP_STD)), dim=-1) for p in pixels.split(256)]
    )
    return float(((img @ txt.T).argmax(1).cpu() == truth).float().mean())


def _auroc(score: np.ndarray, y: np.ndarray) -> float:
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def linear_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, steps: int = 300) -> float:
    """Mean AUROC over concepts of a logistic-regression probe on frozen features."""
    return float(np.nanmean(probe_aurocs(train_x, train_y, test_x, test_y, steps)))


def probe_aurocs(
    train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, steps: int = 300
) -> np.ndarray:
    """Each concept's held-out AUROC of a logistic-regression probe on frozen features (nan: one class only)."""
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
    return np.array([_auroc(scores[:, j], test_y[:, j]) for j in range(test_y.shape[1])])


def train_towers(
    scenes: str | Path,
    out: str | Path,
    sizes: TowerSizes | None = None,
    n_train: int | None = None,
    n_test: int = 1000,
    dino_steps: int | None = None,
    clip_steps: int = 2400,
    progress: bool = True,
    device: str = "cpu",
    dino_batch: int | None = None,
    clip_batch: int = 128,
    only: str | None = None,
    dino_method: str = "mae",
) -> dict[str, Any]:
    """Train both towers on a scenes folder (the last ``n_test`` scenes held out) on ``device`` and save them
    under ``out``; returns where they are, the flags ``sparc extract`` needs, and each tower's quality.
    ``only`` ("dino" or "clip") trains that tower again and keeps the other one ``out`` already holds.
    ``dino_method``: "mae" (masked image modelling; 2,000 steps of 128 unless told) or "distill"
    (self-distillation; 1,000 steps of 64 unless told)."""
    scenes, out = Path(scenes), Path(out)
    sizes = sizes or TowerSizes()
    if only not in (None, "dino", "clip"):
        raise ValueError(f"only={only!r}: use 'dino' or 'clip'")
    if dino_method not in DINO_METHODS:
        raise ValueError(f"dino_method={dino_method!r}: use one of {', '.join(DINO_METHODS)}")
    dino_steps = dino_steps or (2000 if dino_method == "mae" else 1000)
    dino_batch = dino_batch or (128 if dino_method == "mae" else 64)
    kept: dict[str, Any] = {}
    if only is not None:
        if not (out / "towers.json").is_file():
            raise FileNotFoundError(f"{out / 'towers.json'}: not found; training one tower keeps the other from there")
        kept = json.loads((out / "towers.json").read_text())
        for tower in ("dino", "clip"):  # a towers.json from before each tower said what it saw: both saw train_scenes
            if f"{tower}_train_scenes" not in kept and "train_scenes" in kept:
                kept[f"{tower}_train_scenes"] = kept["train_scenes"]
    records = read_scene_records(scenes)
    family = family_of(scenes)
    labels = np.load(scenes / "labels.npy")
    if len(records) <= n_test:
        raise ValueError(f"{scenes}: {len(records)} scenes, need more than the {n_test} held out")
    train_rows = list(range(min(len(records) - n_test, n_train or len(records))))
    test_rows = list(range(len(records) - n_test, len(records)))
    ids = [r["id"] for r in records]
    t0 = time.perf_counter()
    dino_resize = sizes.image_size * 256 // 224  # DINOv2's preprocessing: resize, then the centre crop
    old_curves = kept.get("loss_curves", {})
    curves: dict[str, list[tuple[int, float]]] = {
        "dino": [] if only != "clip" else old_curves.get("dino", []),
        "clip": [] if only != "dino" else old_curves.get("clip", []),
        "clip_zero_shot": [] if only != "dino" else old_curves.get("clip_zero_shot", []),
    }
    report: dict[str, Any] = dict(kept)
    common = {"family": family.name, "concepts": family.concepts, "test_scenes": len(test_rows),
              "image_size": sizes.image_size, "device": device}  # fmt: skip
    trained_on = {"train_scenes": len(train_rows), "scenes": str(scenes)}
    if kept and kept.get("family", family.name) != family.name:
        raise ValueError(f"{out}: its towers learnt the {kept['family']!r} family, {scenes} holds {family.name!r} "
                         f"scenes; train both again (another --out) for another family")  # fmt: skip
    if kept and (kept.get("image_size"), kept.get("test_scenes")) != (sizes.image_size, len(test_rows)):
        raise ValueError(f"{out}: its towers saw {kept.get('image_size')} px and held out {kept.get('test_scenes')} "
                         f"scenes; train both again to change that")  # fmt: skip
    if only != "clip":
        px = load_pixels(scenes, [ids[i] for i in train_rows], sizes.image_size, dino_resize)
        px_test = load_pixels(scenes, [ids[i] for i in test_rows], sizes.image_size, dino_resize)
        trainer = train_dino_masked if dino_method == "mae" else train_dino
        vit = trainer(  # images only: no label, no caption
            px, sizes, steps=dino_steps, batch=dino_batch, progress=progress, device=device,
            on_step=lambda i, v: curves["dino"].append((i, v)),
        )  # fmt: skip
        with torch.no_grad():
            probe_rows = train_rows[: min(len(train_rows), 4000)]
            train_x, test_x = (
                torch.cat([vit.forward_features(_normalised(b, DINO_MEAN, DINO_STD))[:, 0] for b in p.split(256)])
                for p in (px[: len(probe_rows)], px_test)
            )
        probe = linear_probe(train_x, labels[probe_rows], test_x, labels[test_rows])
        dino_path = save_dino_official(vit, out / "dino" / DINO_FILE)
        report |= {
            "dino_weights": str(dino_path.relative_to(out)),  # relative to the towers folder: it can move
            "dino_model": DINO_ARCH,
            "dino_model_args": sizes.dino_args(),
            "dino_linear_probe_auroc": probe,
            "dino_method": dino_method,
            "dino_train_s": time.perf_counter() - t0,
            "dino_steps": dino_steps,
            "dino_batch": dino_batch,
            **{f"dino_{k}": v for k, v in trained_on.items()},
        }
    if only != "dino":
        t1 = time.perf_counter()
        px = load_pixels(scenes, [ids[i] for i in train_rows], sizes.image_size)  # CLIP: resize to the side, no crop
        px_test = load_pixels(scenes, [ids[i] for i in test_rows], sizes.image_size)
        single = [j for j, i in enumerate(test_rows) if len(records[i]["objects"]) == 1]
        objects = [records[test_rows[j]]["objects"][0] for j in single]

        def zero_shot_of(model: torch.nn.Module) -> float:
            return clip_zero_shot(model, px_test[single], objects, sizes, family)

        def report_zero_shot(step: int, top1: float) -> None:
            curves["clip_zero_shot"].append((step, top1))
            if progress:
                tqdm.write(f"CLIP-layout towers: held-out zero-shot top-1 {top1:.3f} after {step} steps")

        clip = train_clip(
            px, [records[i]["caption"] for i in train_rows], sizes, steps=clip_steps, batch=clip_batch,
            progress=progress, on_step=lambda i, v: curves["clip"].append((i, v)), device=device,
            on_eval=lambda i, m: report_zero_shot(i, zero_shot_of(m)),
        )  # fmt: skip
        zero_shot = zero_shot_of(clip)
        curves["clip_zero_shot"].append((clip_steps, zero_shot))
        clip_dir = save_clip_dir(clip, sizes, out / "clip", seen_texts=[records[i]["caption"] for i in train_rows])
        report |= {
            "clip_weights": str(clip_dir.relative_to(out)),
            "clip_layout": sizes.clip_layout,
            "clip_zero_shot_top1": zero_shot,
            "clip_zero_shot_classes": len(family.colours) * len(family.shapes),
            "clip_zero_shot_images": len(single),
            "clip_train_s": time.perf_counter() - t1,
            "clip_steps": clip_steps,
            "clip_batch": clip_batch,
            **{f"clip_{k}": v for k, v in trained_on.items()},
        }
    report |= common | {"loss_curves": curves}
    seen = {report.get("dino_train_scenes"), report.get("clip_train_scenes")}
    if len(seen) == 1:
        report["train_scenes"] = seen.pop()  # both towers saw as many scenes
    else:
        report.pop("train_scenes", None)  # each tower's own count says it
    atomic_write_json(out / "towers.json", report)
    atomic_write_bytes(out / "training_curves.png", curves_png(curves))
    return read_towers(out)


def read_towers(directory: str | Path) -> dict[str, Any]:
    """A towers folder's towers.json with the weights' paths resolved against the folder."""
    directory = Path(directory)
    path = directory / "towers.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {directory} a `sparc towers` folder?)")
    report = json.loads(path.read_text())
    for key in ("dino_weights", "clip_weights"):
        report[key] = str(directory / report[key])  # an absolute path stays as it is
    return report


def encoders_config(report: dict[str, Any], device: str = "cpu") -> Any:
    """The EncodersConfig that loads a towers folder's weights through the real loaders."""
    from ..config import ClipConfig, DinoConfig, EncodersConfig

    dino = DinoConfig(
        model=report["dino_model"], weights=report["dino_weights"], model_args=report["dino_model_args"],
        image_size=report["image_size"],
    )  # fmt: skip
    return EncodersConfig(clip=ClipConfig(weights=report["clip_weights"]), dino=dino, device=device)


def curves_png(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    """The towers' training losses (masked-patch reconstruction or self-distillation; CLIP's contrastive loss) and the CLIP
    towers' held-out zero-shot top-1 along the way, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    titles = {
        "dino": "DINO-layout tower:\ntraining loss",
        "clip": "CLIP-layout towers:\ncontrastive loss",
        "clip_zero_shot": "CLIP-layout towers:\nheld-out zero-shot top-1",
    }
    for k, (name, points) in enumerate(curves.items()):
        ax = fig.add_subplot(1, len(curves), k + 1)
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(titles.get(name, name), fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def extract_flags(report: dict[str, Any]) -> list[str]:
    """The ``sparc extract`` / ``serve`` / ``localize`` flags that load the saved towers."""
    return [
        "--clip-weights", report["clip_weights"],
        "--dino-model", report["dino_model"],
        "--dino-weights", report["dino_weights"],
        "--dino-model-args", json.dumps(report["dino_model_args"]),
        "--dino-image-size", str(report["image_size"]),
    ]  # fmt: skip
