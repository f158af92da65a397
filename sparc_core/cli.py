"""The ``sparc`` command: parse, call the library, print.

Other packages add subcommands through the ``sparc.commands`` entry-point group (a callable that
takes the argparse subparsers object), so this module never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .config import ConfigError, ExtractConfig, SparcError, SynthConfig, TrainConfig, build_config, load_config_file


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} expects NAME=PATH, got {v!r}")
        if name in out:
            raise ConfigError(f"{flag}: stream {name!r} given twice")
        out[name] = path
    return out


def _overlay(base: dict[str, Any], args: argparse.Namespace, keys: list[str]) -> dict[str, Any]:
    out = dict(base)
    for k in keys:
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    return out


# ---- synth ------------------------------------------------------------------------------------------
SYNTH_FLAGS = [  # (flag, field, type, help)
    ("--n-train", "n_train", int, "training rows"),
    ("--n-eval", "n_eval", int, "held-out rows"),
    ("--n-concepts", "n_concepts", int, "planted concepts"),
    ("--concepts-per-sample", "concepts_per_sample", float, "mean concepts drawn per sample"),
    ("--zipf-exponent", "zipf_exponent", float, "concept popularity exponent (0 = uniform)"),
    ("--shared-fraction", "shared_fraction", float, "share of concepts every stream sees"),
    ("--hierarchy", "hierarchy", float, "share of concepts that are children of another"),
    ("--child-similarity", "child_similarity", float, "cosine of a child's direction with its parent's"),
    ("--tower-correlation", "tower_correlation", float, "direction share the text tower takes from the image tower"),
    ("--nuisance-dims", "nuisance_dims", int, "dims of per-stream unpaired variation"),
    ("--nuisance-scale", "nuisance_scale", float, "nuisance norm relative to the signal"),
    ("--magnitudes", "magnitudes", str, "shared or per_stream concept amounts"),
    ("--noise", "noise", float, "noise norm relative to the signal"),
    ("--modality-gap", "modality_gap", float, "per-stream offset norm relative to the signal"),
    ("--seed", "seed", int, "world and sample seed"),
]


def _add_synth(sub: Any) -> None:
    from .config import SYNTH_PRESETS as PRESETS

    p = sub.add_parser("synth", help="write planted-concept paired streams (train/ and eval/ splits)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="YAML/JSON SynthConfig")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named world; the config file and flags override it")
    p.add_argument("--streams", help="NAME=DIM,NAME=DIM,... (default dino=1024,clip_img=768,clip_txt=768)")
    p.add_argument(
        "--visibility",
        action="append",
        metavar="STREAMS=SHARE",
        help="share of concepts seen only by these streams, e.g. dino+clip_img=0.1 (repeatable)",
    )
    for flag, field, typ, text in SYNTH_FLAGS:
        p.add_argument(flag, dest=field, type=typ, help=text)
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .worlds.synthetic import PRESETS, write_synthetic

    data = dict(PRESETS[args.preset]) if args.preset else {}
    data |= load_config_file(args.config) if args.config else {}
    data = _overlay(data, args, [field for _, field, _, _ in SYNTH_FLAGS])
    if args.streams:
        streams = {}
        for part in args.streams.split(","):
            name, _, dim = part.partition("=")
            if not dim.isdigit():
                raise ConfigError(f"--streams expects NAME=DIM, got {part!r}")
            streams[name] = int(dim)
        data["streams"] = streams
    if args.visibility:
        groups = {}
        for part in args.visibility:
            group, _, share = part.partition("=")
            try:
                groups[group] = float(share)
            except ValueError:
                raise ConfigError(f"--visibility expects STREAMS=SHARE, got {part!r}") from None
        data["visibility"] = groups
    cfg = build_config(SynthConfig, data, args.config or "command line")
    paths = write_synthetic(cfg, args.out)
    print(json.dumps(paths, indent=2))
    return 0


# ---- train ------------------------------------------------------------------------------------------
TRAIN_FLAGS = [
    "labels",
    "out",
    "n_latents",
    "k",
    "steps",
    "batch_size",
    "lr",
    "topk",
    "cross_coef",
    "align_coef",
    "alone_select_prob",
    "auxk",
    "seed",
    "device",
    "eval_every",
    "save_every",
    "input_norm",
    "min_rel_activation",
]


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a SPARC model on paired feature files")
    p.add_argument("--features", action="append", metavar="NAME=PATH", help="one per stream (.npy, .safetensors, .h5)")
    p.add_argument("--config", help="YAML/JSON TrainConfig; flags override it")
    p.add_argument("--labels", help="per-sample concept labels .npy (for label-weighted Jaccard)")
    p.add_argument("--out", help="checkpoint directory")
    p.add_argument("--n-latents", dest="n_latents", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--selection", dest="topk", choices=["global", "local"], help="Global TopK (SPARC) or Local TopK")
    renamed(p, "--topk", "topk", choices=["global", "local"])
    p.add_argument("--cross-coef", dest="cross_coef", type=float, help="lambda of the cross-reconstruction loss")
    p.add_argument("--align-coef", dest="align_coef", type=float, help="weight of the one-stream agreement loss")
    p.add_argument(
        "--alone-select-prob", dest="alone_select_prob", type=float,
        help="share of samples whose shared indices come from one stream alone",
    )  # fmt: skip
    renamed(p, "--solo-select-prob", "alone_select_prob", type=float)
    p.add_argument("--auxk", type=int)
    p.add_argument("--input-norm", dest="input_norm", choices=["l2", "scale", "none"])
    p.add_argument(
        "--min-rel-activation",
        dest="min_rel_activation",
        type=float,
        help="drop selected activations weaker than this x the row's strongest (0 keeps all k)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument(
        "--overwrite", action="store_true", help="train anew into an --out holding a checkpoint (replaced at the first save)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from an optional config file overlaid with command-line flags."""
    data = load_config_file(args.config) if args.config else {}
    data = _overlay(data, args, TRAIN_FLAGS)
    feats = _pairs(args.features, "--features")
    if feats:
        data["features"] = feats
    if args.quiet:
        data["progress"] = False
    return build_config(TrainConfig, data, args.config or "command line")


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config_from_args(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"checkpoint: {out}")
    return 0


# ---- eval -------------------------------------------------------------------------------------------
def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (each stream encoded alone) and write a JSON report")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--features", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--labels", help="per-sample concept labels .npy")
    p.add_argument("--gallery", type=int, default=2000, help="gallery size for retrieval metrics")
    p.add_argument("--max-rows", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--out", help="report path (default CHECKPOINT/eval_report.json)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, pick_device
    from .data import PairedFeatures
    from .metrics import evaluate
    from .report import format_report

    model = load_checkpoint(args.checkpoint, device=pick_device())
    feats = _pairs(args.features, "--features")
    unknown = sorted(set(feats) - set(model.streams))
    if unknown:
        raise ConfigError(f"--features names stream(s) {unknown} that the checkpoint does not have (it has {model.streams})")
    data = PairedFeatures(feats, args.labels)
    data.validate(dims={s: d for s, d in model.cfg.streams.items() if s in data.stores})
    n = data.n_rows if args.max_rows is None else min(args.max_rows, data.n_rows)
    feats = data.read_range(0, n)
    labels = None if data.labels is None else data.labels[:n]
    report = evaluate(model, feats, labels=labels, gallery=args.gallery)
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval_report.json"
    atomic_write_json(out, report)
    print(format_report({"model": report}))
    print(f"report: {out}")
    return 0


# ---- extract ----------------------------------------------------------------------------------------
def add_encoder_flags(p: argparse.ArgumentParser) -> None:
    """The flags that point at local CLIP / DINOv2 weights (shared by extract and serve)."""
    p.add_argument("--clip-model", help="open_clip model name (e.g. ViT-L-14) or a model-config .json")
    p.add_argument("--clip-weights", help="open_clip checkpoint file or model directory (or $SPARC_CLIP_WEIGHTS)")
    p.add_argument("--dino-model", help="timm DINOv2 architecture (default vit_large_patch14_reg4_dinov2)")
    p.add_argument("--dino-weights", help="official DINOv2 .pth, timm state dict or model directory (or $SPARC_DINO_WEIGHTS)")
    p.add_argument("--dino-model-args", help="extra timm arguments as JSON, e.g. '{\"embed_dim\": 384}'")
    p.add_argument("--dino-image-size", type=int, help="DINOv2 input side in pixels (default 224)")


def encoder_overrides(args: argparse.Namespace, enc: dict[str, Any], always: bool = False) -> dict[str, Any]:
    """An EncodersConfig dict overlaid with the encoder flags; a family is added when flagged (or ``always``)."""
    enc = dict(enc)
    dino_args = None
    if args.dino_model_args:
        try:
            dino_args = json.loads(args.dino_model_args)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--dino-model-args: not valid JSON ({e.msg})") from None
    flags = {
        "clip": {"model": args.clip_model, "weights": args.clip_weights},
        "dino": {
            "model": args.dino_model,
            "weights": args.dino_weights,
            "image_size": args.dino_image_size,
            "model_args": dino_args,
        },
    }
    for family, values in flags.items():
        given = {k: v for k, v in values.items() if v is not None}
        if given or always:
            enc[family] = {**(enc.get(family) or {}), **given}
    return enc


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a batch job that can run on Ray (shared by extract and index build)."""
    g = p.add_argument_group("cluster (--engine ray; needs sparc[ray])")
    g.add_argument("--engine", choices=["local", "ray"], help="local (default): this process; ray: an actor pool on Ray")
    g.add_argument("--address", help="a running Ray cluster (auto, ray://HOST:10001); default: a local one here")
    g.add_argument("--actors", type=int, help="actor pool size (default: one per GPU, else one per --cpus-per-actor)")
    g.add_argument("--cpus-per-actor", type=float, help="CPUs each actor reserves (default 1)")
    g.add_argument("--gpus-per-actor", type=float, help="GPUs each actor reserves (default 1 when the cluster has GPUs)")
    g.add_argument("--num-cpus", type=int, help="CPUs of the local cluster started without --address (default all)")


def cluster_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ClusterConfig dict overlaid with the cluster flags."""
    return _overlay(dict(base or {}), args, ["address", "actors", "cpus_per_actor", "gpus_per_actor", "num_cpus"])


def _add_extract(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="extract paired DINOv2 / CLIP image / CLIP text features from images + captions (local weights only)",
    )
    p.add_argument("--config", help="YAML/JSON ExtractConfig; flags override it")
    p.add_argument("--images", help="image folder (caption-file paths are relative to it)")
    p.add_argument("--captions", help="CSV/TSV/JSON Lines (image_path, caption[, id]) or COCO captions JSON")
    p.add_argument("--out", help="output directory")
    add_encoder_flags(p)
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP streams")
    p.add_argument("--dino-patch-tokens", action="store_true", help="also write the patch tokens (float16)")
    p.add_argument("--no-dino", action="store_true", help="skip the DINOv2 stream")
    p.add_argument("--all-captions", action="store_true", help="one row per caption instead of per image")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="image-decoding processes (default 4)")
    p.add_argument("--chunk-size", type=int, help="rows per resumable chunk (default 4096)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--keep-chunks", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cluster_flags(p)
    p.set_defaults(func=_cmd_extract)


def extract_config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """ExtractConfig from an optional config file overlaid with command-line flags."""
    data = load_config_file(args.config) if args.config else {}
    data = _overlay(data, args, ["images", "captions", "out", "batch_size", "workers", "chunk_size", "engine"])
    data["cluster"] = cluster_from_args(args, data.get("cluster"))
    enc = _overlay(dict(data.get("encoders") or {}), args, ["device", "precision"])
    enc = encoder_overrides(args, enc, always=True)
    if args.dino_patch_tokens:
        enc["dino"]["patch_tokens"] = True
    if args.no_clip:
        enc["clip"] = None
    if args.no_dino:
        enc["dino"] = None
    data["encoders"] = enc
    for flag in ("all_captions", "keep_chunks"):
        if getattr(args, flag):
            data[flag] = True
    if args.quiet:
        data["progress"] = False
    return build_config(ExtractConfig, data, args.config or "command line")


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract

    cfg = extract_config_from_args(args)
    manifest = extract(cfg)
    out = cfg.out
    streams = ", ".join(f"{s} {v['dim']}-d" for s, v in manifest["streams"].items())
    print(f"{manifest['rows']} rows ({streams}), {manifest['rejected']} rejected -> {out}")
    return 0


# ---- demo -------------------------------------------------------------------------------------------
def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="synthesise data, train SPARC and the Local-TopK baseline on CPU, compare")
    p.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .worlds.demo import run_demo

    run_demo(args.out, steps=args.steps, progress=not args.quiet)
    return 0


# ---- entry ------------------------------------------------------------------------------------------
# ---- see the concepts ---------------------------------------------------------------------------------------
def _explain_setup(args: argparse.Namespace, need_dino: bool) -> tuple[Any, dict[str, Any], dict[int, str]]:
    from .checkpoint import load_checkpoint, pick_device
    from .config import EncodersConfig
    from .encoders import load_encoders

    model = load_checkpoint(args.checkpoint, device=pick_device())
    enc_cfg = encoder_overrides(args, {}, always=False)
    if "clip" not in enc_cfg:
        enc_cfg["clip"] = {}  # weights from $SPARC_CLIP_WEIGHTS, or a clear error naming what to pass
    if need_dino and "dino" not in enc_cfg:
        enc_cfg["dino"] = {}
    encoders = load_encoders(build_config(EncodersConfig, enc_cfg, "encoder flags"))
    return model, encoders, _latent_names(args.checkpoint)


def _latent_names(checkpoint: str) -> dict[int, str]:
    from .explain.naming import load_latent_names

    return load_latent_names(checkpoint)


def _add_name_latents(sub: Any) -> None:
    p = sub.add_parser("name-latents", help="name each latent by the vocabulary entries (words, captions) that fire it")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--vocab", required=True, help="words/phrases, one per line, or a captions file (CSV/TSV/JSONL/COCO)")
    p.add_argument("--names-per-latent", dest="top", type=int, default=5, help="names kept per latent (default 5)")
    renamed(p, "--top", "top", type=int)
    add_encoder_flags(p)
    p.set_defaults(func=_cmd_name_latents)


def _cmd_name_latents(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .explain.naming import NamingError, _read_vocab, name_latents, write_latent_names

    model, encoders, _ = _explain_setup(args, need_dino=False)
    text_enc = next((e for e in encoders.values() if e.modality == "text"), None)
    if text_enc is None or text_enc.stream not in model.streams:
        raise NamingError(f"naming needs a text stream the checkpoint has (it has {model.streams})")
    vocab = _read_vocab(args.vocab)
    feats = []
    for a in tqdm(range(0, len(vocab), 256), desc="encoding vocabulary", unit="batch"):
        feats.append(text_enc.encode_texts(vocab[a : a + 256]))
    named = name_latents(model, text_enc.stream, _stack(feats), vocab, top=args.top)
    out = write_latent_names(args.checkpoint, named, str(args.vocab), text_enc.stream, model.n_latents)
    print(f"named {len(named)} of {model.n_latents} latents from {len(vocab)} entries: {out}")
    for lat in list(named)[:10]:
        print(f"  {lat}: " + ", ".join(f"{n} ({v:.2f})" for n, v in named[lat][:3]))
    return 0


def _stack(parts: list) -> Any:
    import torch

    return torch.cat(parts).numpy()


def _add_scenes(sub: Any) -> None:
    p = sub.add_parser("scenes", help="render image-caption pairs with known objects, attributes and masks")
    p.add_argument("--out", required=True, help="output folder (images/, captions.csv, masks/, scenes.jsonl, labels.npy)")
    p.add_argument("--n", type=int, default=20_000, help="scenes to render (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--family", default="shapes", help="vocabulary, look and caption grammar: shapes (default) or glyphs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new set is complete)")
    p.add_argument("--workers", type=int, default=0, help="rendering processes (default 0: one per CPU); same files either way")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_scenes)


def _cmd_scenes(args: argparse.Namespace) -> int:
    from .worlds.scenes import write_scenes

    out = write_scenes(
        args.out, args.n, seed=args.seed, size=args.size, overwrite=args.overwrite, progress=not args.quiet, family=args.family,
        workers=args.workers,
    )  # fmt: skip
    print(
        f"{args.n} scenes: {out / 'images'}, captions {out / 'captions.csv'}, masks {out / 'masks'}, truth {out / 'scenes.jsonl'}"
    )
    return 0


def _add_towers(sub: Any) -> None:
    p = sub.add_parser("towers", help="train small DINOv2- and CLIP-layout towers on a `sparc scenes` folder")
    p.add_argument("--scenes", required=True, help="a folder written by `sparc scenes`")
    p.add_argument("--out", required=True, help="writes dino/*.pth (official DINOv2 layout), clip/ (open_clip dir), towers.json")
    p.add_argument("--n-train", type=int, help="train on at most this many scenes (the last 1000 are held out)")
    p.add_argument(
        "--dino-method", choices=("mae", "distill"), default="mae",
        help="how the DINO-layout tower learns from the images alone: masked image modelling (MAE) or self-distillation (DINO)",
    )  # fmt: skip
    p.add_argument("--dino-steps", type=int, help="DINO-layout training steps (default: 2000 for mae, 1000 for distill)")
    p.add_argument("--clip-steps", type=int, default=2400, help="contrastive steps of the CLIP-layout towers")
    p.add_argument(
        "--clip-layout", choices=("vit", "resnet"), default="vit",
        help="the CLIP image tower: a ViT (as ViT-B/16) or open_clip's ModifiedResNet (as RN50; learns shape in fewer steps)",
    )  # fmt: skip
    p.add_argument("--only", choices=("dino", "clip"), help="train this tower again and keep the other one OUT holds")
    p.add_argument("--dino-batch", type=int, help="images per DINO-layout training step (default: 128 for mae, 64 for distill)")
    p.add_argument("--clip-batch", type=int, default=128, help="(image, caption) pairs per contrastive step")
    p.add_argument("--device", default="auto", help="where both towers train: cpu, cuda, cuda:1, or auto (cuda when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_towers)


def _cmd_towers(args: argparse.Namespace) -> int:
    from .checkpoint import pick_device
    from .worlds.towers import TowerSizes, extract_flags, train_towers

    r = train_towers(
        args.scenes,
        args.out,
        sizes=TowerSizes(clip_layout=args.clip_layout),
        n_train=args.n_train,
        dino_steps=args.dino_steps,
        clip_steps=args.clip_steps,
        progress=not args.quiet,
        device=str(pick_device(args.device)),
        dino_batch=args.dino_batch,
        clip_batch=args.clip_batch,
        only=args.only,
        dino_method=args.dino_method,
    )
    how = {"mae": "masked image modelling", "distill": "self-distillation"}.get(r.get("dino_method", "distill"))
    print(
        f"DINO-layout tower ({how}, no labels): linear probe of the {len(r['concepts'])} concepts on its "
        f"features, mean AUROC {r['dino_linear_probe_auroc']:.3f}"
    )
    print(
        f"CLIP-layout towers: zero-shot top-1 {r['clip_zero_shot_top1']:.3f} over {r['clip_zero_shot_classes']} colour x shape "
        f"classes ({r['clip_zero_shot_images']} single-object scenes; chance {1 / r['clip_zero_shot_classes']:.3f})"
    )
    print("load them with: " + " ".join(json.dumps(f) if " " in f or "{" in f else f for f in extract_flags(r)))
    return 0


def _add_localize(sub: Any) -> None:
    p = sub.add_parser("localize", help="heatmap of a caption's concepts (or chosen latents) on an image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a caption: its sparse code (CLIP text tower) is what the map looks for")
    what.add_argument("--latent", type=int, action="append", help="a latent to look for (repeat for several)")
    what.add_argument("--concept", action="append", help="the latents named so in latent_names.json (repeatable)")
    p.add_argument("--stream", default="dino", help="the image encoder's stream: dino (default) or clip_img")
    p.add_argument(
        "--method",
        default="relevance",
        help="relevance (default), gradcam, grad-x-input; CLIP's own baselines clip-relevance, clip-cosine (CLIP image tower)",
    )
    p.add_argument("--max-latents", dest="top", type=int, default=None, help="use only the caption's N strongest latents")
    renamed(p, "--top", "top", type=int)
    p.add_argument("--out", required=True, help="PNG overlay")
    p.add_argument("--json", help="also write the grid and the latents used as JSON")
    add_encoder_flags(p)
    p.set_defaults(func=_cmd_localize)


def _cmd_localize(args: argparse.Namespace) -> int:
    from .explain.attribution import AttributionError, latent_target, localize, save_heatmap_png, text_target

    model, encoders, names = _explain_setup(args, need_dino=args.stream == "dino")
    if args.stream not in encoders or encoders[args.stream].modality != "image":
        raise AttributionError(
            f"no image encoder feeds stream {args.stream!r} (image encoders: "
            f"{[s for s, e in encoders.items() if e.modality == 'image']})"
        )
    text_enc = next((e for e in encoders.values() if e.modality == "text"), None)
    if args.text is not None:
        if text_enc is None:
            raise AttributionError("--text needs the CLIP text tower (--clip-weights)")
        target = text_target(model, text_enc, args.text, top=args.top)
    else:
        target = latent_target(model, args.latent or _named_latents(names, args.concept))
    image = _read_image(args.image)
    hm = localize(model, encoders[args.stream], image, target, method=args.method, text_encoder=text_enc, names=names)
    save_heatmap_png(hm, args.out)
    if args.json:
        atomic_write_json(Path(args.json), hm.to_json())
    h, w = hm.grid.shape
    if not hm.target_fires:
        print(f"heatmap {h}x{w} ({hm.method} on {args.stream}): {hm.note}: {args.out}")
        return 0
    peak = divmod(int(hm.grid.argmax()), w)
    print(f"heatmap {h}x{w} ({hm.method} on {args.stream}), peak at patch (row, col) {peak}: {args.out}")
    return 0


def _named_latents(names: dict[int, str], concepts: list[str]) -> list[int]:
    from .explain.naming import latents_named

    return sorted({i for c in concepts for i in latents_named(names, c)})


def _add_explain_pair(sub: Any) -> None:
    p = sub.add_parser("explain-pair", help="for an image and its caption: the shared latents, where and which words")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True, help="the caption")
    p.add_argument("--stream", default="dino", help="the image encoder's stream: dino (default) or clip_img")
    p.add_argument("--method", default="relevance", help="heatmap method: relevance (default), gradcam, grad-x-input")
    p.add_argument("--max-latents", type=int, default=8, help="explain at most this many shared latents (1-8)")
    p.add_argument("--out", required=True, help="PNG: a row per shared latent (heatmap, caption words)")
    p.add_argument("--json", help="also write the shared latents, their grids and word scores as JSON")
    add_encoder_flags(p)
    p.set_defaults(func=_cmd_explain_pair)


def _cmd_explain_pair(args: argparse.Namespace) -> int:
    from .explain.attribution import AttributionError, explain_pair, save_pair_png

    model, encoders, names = _explain_setup(args, need_dino=args.stream == "dino")
    image_enc, text_enc = encoders.get(args.stream), next((e for e in encoders.values() if e.modality == "text"), None)
    if image_enc is None or image_enc.modality != "image":
        raise AttributionError(f"no image encoder feeds stream {args.stream!r}")
    if text_enc is None:
        raise AttributionError("a pair needs the CLIP text tower (--clip-weights)")
    pair = explain_pair(
        model, image_enc, text_enc, _read_image(args.image), args.text, args.method, max_latents=args.max_latents, names=names
    )
    save_pair_png(pair, args.out)
    if args.json:
        atomic_write_json(Path(args.json), pair.to_json())
    if not pair.concepts:
        print(f"the image and the caption share no agreed latent: {args.out}")
        return 0
    for c in pair.concepts:
        h, w = c.heatmap.grid.shape
        peak = divmod(int(c.heatmap.grid.argmax()), w)
        top = c.words.words[int(max(range(len(c.words.scores)), key=lambda j: c.words.scores[j]))]
        name = f" '{names[c.latent]}'" if c.latent in names else ""
        print(f"latent {c.latent}{name}: image {c.image_value:.2f}, caption {c.text_value:.2f}; peak patch {peak}, word {top!r}")
    print(f"pair: {args.out}")
    return 0


def _read_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    from .explain.attribution import AttributionError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise AttributionError(f"{path}: not a readable image ({e})") from None


def _add_attribute(sub: Any) -> None:
    p = sub.add_parser("attribute", help="which words of a caption drive its concepts (or chosen latents)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--latent", type=int, action="append", help="attribute these latents (default: the caption's code)")
    p.add_argument("--concept", action="append", help="attribute the latents named so in latent_names.json (repeatable)")
    p.add_argument("--method", default="grad", choices=["grad", "relevance"])
    p.add_argument("--out", required=True, help="PNG strip of the caption, words shaded by score")
    p.add_argument("--json", help="also write the (word, score) list as JSON")
    add_encoder_flags(p)
    p.set_defaults(func=_cmd_attribute)


def _cmd_attribute(args: argparse.Namespace) -> int:
    from .explain.attribution import AttributionError, attribute_text, latent_target, save_words_png

    model, encoders, names = _explain_setup(args, need_dino=False)
    text_enc = next((e for e in encoders.values() if e.modality == "text"), None)
    if text_enc is None:
        raise AttributionError("caption attribution needs the CLIP text tower (--clip-weights)")
    chosen = args.latent or (_named_latents(names, args.concept) if args.concept else None)
    target = latent_target(model, chosen) if chosen else None
    ws = attribute_text(model, text_enc, args.text, target, method=args.method)
    save_words_png(ws, args.out, names)
    if args.json:
        atomic_write_json(Path(args.json), ws.to_json())
    print(" ".join(f"{w}:{s:+.2f}" for w, s in zip(ws.words, ws.scores)))
    print(f"words: {args.out}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparc")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def renamed(p: argparse.ArgumentParser, old: str, dest: str, **kw: Any) -> None:
    """Keep accepting a flag's earlier spelling (hidden from --help) for the same destination."""
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The full ``sparc`` parser, including subcommands registered by other installed packages."""
    parser = argparse.ArgumentParser(prog="sparc", description="SPARC: one sparse concept space shared by many models")
    parser.add_argument("--version", action="version", version=f"sparc {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_synth,
        _add_scenes,
        _add_towers,
        _add_extract,
        _add_train,
        _add_eval,
        _add_demo,
        _add_localize,
        _add_explain_pair,
        _add_attribute,
        _add_name_latents,
    ):
        add(sub)
    for ep in entry_points(group="sparc.commands"):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``sparc`` command; user errors print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SparcError, FileNotFoundError) as e:
        print(f"sparc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (head)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush is quiet
        return 141


if __name__ == "__main__":
    sys.exit(main())
