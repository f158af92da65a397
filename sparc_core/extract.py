"""Batch feature extraction: images + captions in, one paired feature file per stream out.

Work is cut into chunks of ``chunk_size`` rows; each finished chunk is one safetensors file written
atomically, so a crash loses at most the chunk in progress and re-running the same command resumes.
Batches never cross a chunk boundary, so a resumed run computes exactly what an uninterrupted one does.
An image that cannot be read drops its whole row from every stream (pairing is kept) and is recorded
in ``rejects.jsonl``. When every chunk is done the chunks are assembled into::

    OUT/<stream>.npy       float32 [rows, dim], one per stream, rows paired by position
    OUT/<stream>_patches.npy  float16 [rows, n_patches, dim] (DINOv2 patch tokens, when asked for)
    OUT/ids.txt            one id per row
    OUT/rejects.jsonl      the rows left out, with the reason
    OUT/extract.json       what was run (written last: its presence means the run is complete)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .atomic import atomic_path, atomic_write_bytes, atomic_write_json
from .checkpoint import atomic_save_tensors
from .config import ExtractConfig, SparcError
from .encoders import DinoEncoder, FeatureEncoder, load_encoders

log = logging.getLogger(__name__)
MANIFEST = "extract.json"
CHUNKS = "chunks"
_IMAGE_KEYS = ("image_path", "image", "file_name", "filepath", "path")
_CAPTION_KEYS = ("caption", "text")


class ExtractError(SparcError, ValueError):
    """Input that cannot be extracted (caption file, image folder, output directory); names the problem."""


@dataclass(frozen=True)
class Item:
    """One row to extract: an image (relative to the image folder), its caption and its id."""

    image: str
    caption: str
    id: str


# ---- captions ----------------------------------------------------------------------------------------
def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) pairs of a CSV, JSON Lines or plain JSON list file."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        return [(f"{path}:{i + 2}", dict(r)) for i, r in enumerate(reader)]
    if path.suffix.lower() == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append((f"{path}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ExtractError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        return out
    raise ExtractError(f"{path}: unsupported caption file (use .csv, .tsv, .jsonl or a COCO captions .json)")


def _coco(path: Path, data: dict[str, Any], all_captions: bool) -> list[Item]:
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        anns = sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0)))
    except (KeyError, TypeError) as e:
        raise ExtractError(f"{path}: not a COCO captions file (missing {e})") from None
    items, seen = [], set()
    for a in anns:
        if a["image_id"] not in files:
            raise ExtractError(f"{path}: annotation {a.get('id')} names unknown image_id {a['image_id']}")
        if not all_captions and a["image_id"] in seen:
            continue
        seen.add(a["image_id"])
        ident = str(a.get("id", a["image_id"])) if all_captions else str(a["image_id"])
        items.append(Item(files[a["image_id"]], str(a["caption"]).strip(), ident))
    return items


def read_captions(path: str | Path, all_captions: bool = False) -> list[Item]:
    """The rows to extract from a CSV/TSV/JSON Lines file (image_path, caption[, id]) or a COCO captions JSON.

    Without ``all_captions`` an image listed with several captions keeps its first one.
    """
    path = Path(path)
    if not path.is_file():
        raise ExtractError(f"caption file not found: {path}")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ExtractError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            items = _coco(path, data, all_captions)
            return _check_ids(path, items)
        records = [(f"{path}[{i}]", r) for i, r in enumerate(data)] if isinstance(data, list) else []
    else:
        records = _records(path)
    items, per_image = [], {}
    for where, r in records:
        if not isinstance(r, dict):
            raise ExtractError(f"{where}: expected an object with image_path and caption")
        image, caption = _pick(r, _IMAGE_KEYS), _pick(r, _CAPTION_KEYS)
        if image is None:
            raise ExtractError(f"{where}: no image path (one of the columns {list(_IMAGE_KEYS)})")
        if caption is None or not str(caption).strip():
            raise ExtractError(f"{where}: empty caption for {image}")
        n = per_image.get(image, 0)
        per_image[image] = n + 1
        if n and not all_captions:
            continue
        ident = r.get("id")
        ident = str(ident) if ident not in (None, "") else (image if not all_captions else f"{image}#{n}")
        items.append(Item(str(image), str(caption).strip(), ident))
    return _check_ids(path, items)


def _check_ids(path: Path, items: list[Item]) -> list[Item]:
    if not items:
        raise ExtractError(f"{path}: no rows")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise ExtractError(f"{path}: id {it.id!r} appears twice; ids must be unique")
        if "\n" in it.id:
            raise ExtractError(f"{path}: id {it.id!r} contains a newline")
        seen.add(it.id)
    return items


# ---- decoding ------------------------------------------------------------------------------------------
class _Images(Dataset):
    """Decodes one row's image and applies every image encoder's transform; failures come back as a reason."""

    def __init__(self, root: Path, items: list[Item], transforms: dict[str, Callable]) -> None:
        self.root, self.items, self.transforms = root, items, transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, dict[str, torch.Tensor] | None, str]:
        try:
            with Image.open(self.root / self.items[i].image) as im:
                im = im.convert("RGB")
            return i, {s: t(im) for s, t in self.transforms.items()}, ""
        except Exception as e:  # unreadable, truncated, not an image, too large: the row is rejected
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch: list) -> tuple[list[int], dict[str, torch.Tensor], list[tuple[int, str]]]:
    ok = [(i, px) for i, px, _ in batch if px is not None]
    rows = [i for i, _ in ok]
    pixels = {s: torch.stack([px[s] for _, px in ok]) for s in (ok[0][1] if ok else {})}
    return rows, pixels, [(i, err) for i, px, err in batch if px is None]


# ---- the run ------------------------------------------------------------------------------------------
def describe_encoders(encoders: dict[str, FeatureEncoder]) -> dict[str, dict[str, Any]]:
    """What the output needs to know of each stream's encoder (a cluster's driver asks a worker for it)."""
    info = {}
    for s, e in encoders.items():
        path = getattr(e, "weights", None)
        st = path.stat() if path is not None else None
        info[s] = {
            "name": e.name,
            "dim": e.dim,
            "modality": e.modality,
            "patch_tokens": bool(isinstance(e, DinoEncoder) and e.patch_tokens),
            "weights": [str(path.resolve()), st.st_size, st.st_mtime_ns] if st is not None else None,
        }
    return info


def _fingerprint(cfg: ExtractConfig, items: list[Item], info: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the output depends on; a resumed run must match it exactly (whichever engine ran it)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.image, it.caption, it.id]).encode())
    return {
        "rows_sha256": h.hexdigest(),
        "images": str(Path(cfg.images).resolve()),
        "encoders": cfg.encoders.model_dump(),
        "weights": [v["weights"] for v in info.values() if v["weights"] is not None],
        "streams": {s: [v["name"], v["dim"]] for s, v in info.items()},
        "chunk_size": cfg.chunk_size,
        "batch_size": cfg.batch_size,
    }


def _chunk_path(out: Path, c: int) -> Path:
    return out / CHUNKS / f"chunk_{c:06d}.safetensors"


def _chunk_done(path: Path, fp_hash: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fp_hash
    except Exception:  # a torn file from a crash is redone
        return False


def _encode_batch(
    encoders: dict[str, FeatureEncoder], rows: list[int], pixels: dict[str, torch.Tensor], items: list[Item]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    # Rows that share an image (several captions of one image) encode it once.
    first: dict[str, int] = {}  # image -> position of its first row in the batch
    for pos, i in enumerate(rows):
        first.setdefault(items[i].image, pos)
    unique = torch.tensor(list(first.values()))
    slot = {image: n for n, image in enumerate(first)}
    inverse = torch.tensor([slot[items[i].image] for i in rows])
    for s, enc in encoders.items():
        if enc.modality == "text":
            out[s] = enc.encode_texts([items[i].caption for i in rows])
        elif isinstance(enc, DinoEncoder) and enc.patch_tokens:
            cls, patches = enc.tokens(pixels[s][unique])
            out[s], out[f"{s}_patches"] = cls[inverse], patches.half()[inverse]
        else:
            out[s] = enc.encode_pixels(pixels[s][unique])[inverse]
    return out


def extract(cfg: ExtractConfig, encoders: dict[str, FeatureEncoder] | None = None) -> dict[str, Any]:
    """Run (or resume) an extraction; returns the manifest of the assembled files. With ``cfg.engine`` "ray"
    the chunks are encoded by an actor pool on a Ray cluster (:mod:`sparc_core.cluster`); either engine
    resumes what the other left."""
    root = Path(cfg.images)
    if not root.is_dir():
        raise ExtractError(f"image folder not found: {root}")
    items = read_captions(cfg.captions, cfg.all_captions)
    if cfg.engine == "ray":
        if encoders is not None:
            raise ExtractError("the ray engine loads the encoders on its workers; give a config, not encoders")
        from .cluster import extract_on_ray

        return extract_on_ray(cfg, items)
    encoders = load_encoders(cfg.encoders) if encoders is None else encoders
    if not encoders:
        raise ExtractError("no encoder configured")
    info = describe_encoders(encoders)
    plan = plan_chunks(cfg, items, info)
    if isinstance(plan, dict):
        return plan
    fp, fp_hash, pending = plan
    batches, owner = chunk_batches(cfg, len(items), pending)
    done_rows = len(items) - sum(len(b) for b in batches)
    with tqdm(total=len(items), initial=done_rows, unit="img", desc="extract", disable=not cfg.progress) as bar:
        _run_batches(cfg, items, encoders, info, fp_hash, batches, owner, bar.update)
    return assemble(cfg, items, info, fp, fp_hash)


def plan_chunks(
    cfg: ExtractConfig, items: list[Item], info: dict[str, dict[str, Any]]
) -> dict[str, Any] | tuple[dict[str, Any], str, list[int]]:
    """The finished run's manifest, or (fingerprint, its hash, the chunks still to do); refuses an output
    folder that holds another run's work."""
    out = Path(cfg.out)
    fp = _fingerprint(cfg, items, info)
    fp_hash = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fp_hash:
            log.info("%s: already complete", out)
            return manifest
        raise ExtractError(f"{out} already holds features extracted with other inputs or settings; choose another --out")
    fp_file = out / CHUNKS / "fingerprint.json"
    if fp_file.is_file() and json.loads(fp_file.read_text()).get("hash") != fp_hash:
        raise ExtractError(
            f"{out} holds a partial extraction with other inputs or settings (captions, models, weights, "
            "chunk or batch size); re-run it with the same ones, or choose another --out"
        )
    atomic_write_json(fp_file, {"hash": fp_hash, **fp})
    n_chunks = -(-len(items) // cfg.chunk_size)
    return fp, fp_hash, [c for c in range(n_chunks) if not _chunk_done(_chunk_path(out, c), fp_hash)]


def chunk_rows(cfg: ExtractConfig, n_items: int, c: int) -> range:
    """The rows of chunk ``c``."""
    return range(c * cfg.chunk_size, min((c + 1) * cfg.chunk_size, n_items))


def chunk_batches(cfg: ExtractConfig, n_items: int, chunks: list[int]) -> tuple[list[list[int]], list[int]]:
    """The batches of ``chunks`` (rows) and the chunk of each: batches never cross a chunk, so a resumed or
    distributed run encodes every row in the same batch as an uninterrupted local one."""
    batches, owner = [], []
    for c in chunks:
        rows = chunk_rows(cfg, n_items, c)
        for b in range(rows.start, rows.stop, cfg.batch_size):
            batches.append(list(range(b, min(b + cfg.batch_size, rows.stop))))
            owner.append(c)
    return batches, owner


def extract_chunk(
    cfg: ExtractConfig, items: Any, c: int, encoders: dict[str, FeatureEncoder], info: dict[str, dict[str, Any]],
    fp_hash: str,
) -> tuple[int, int]:  # fmt: skip
    """Encode and write chunk ``c`` alone (what a cluster worker does); ``items[i]`` is row ``i``'s Item for
    the chunk's rows. Returns (rows written, rows rejected)."""
    batches, owner = chunk_batches(cfg, len(items), [c])
    return _run_batches(cfg, items, encoders, info, fp_hash, batches, owner)


def _run_batches(
    cfg: ExtractConfig, items: Any, encoders: dict[str, FeatureEncoder], info: dict[str, dict[str, Any]], fp_hash: str,
    batches: list[list[int]], owner: list[int], on_batch: Callable[[int], Any] | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Decode, encode and write the chunks ``batches`` cover (batch n belongs to chunk ``owner[n]``; a chunk
    is written once its last batch is in); ``on_batch(rows)`` after each batch. Returns (rows written, rows
    rejected)."""
    transforms = {s: e.preprocess for s, e in encoders.items() if e.modality == "image"}
    loader = DataLoader(
        _Images(Path(cfg.images), items, transforms),
        batch_sampler=batches,
        num_workers=cfg.workers if batches else 0,
        collate_fn=_collate,
        pin_memory=any(e.device.type == "cuda" for e in encoders.values()),
        persistent_workers=False,
    )
    acc: dict[str, list[torch.Tensor]] = {}
    acc_rows: list[int] = []
    rejects: list[dict[str, Any]] = []
    written = rejected = 0
    for n, (rows, pixels, failed) in enumerate(loader):
        for i, err in failed:
            log.warning("skipping %s: %s", items[i].image, err)
            rejects.append({"row": i, "id": items[i].id, "image": items[i].image, "error": err})
        if rows:
            for key, feats in _encode_batch(encoders, rows, pixels, items).items():
                acc.setdefault(key, []).append(feats)
            acc_rows.extend(rows)
        if on_batch is not None:
            on_batch(len(rows) + len(failed))
        if n + 1 == len(batches) or owner[n + 1] != owner[n]:
            _write_chunk(Path(cfg.out), owner[n], info, acc, acc_rows, rejects, fp_hash)
            written, rejected = written + len(acc_rows), rejected + len(rejects)
            acc, acc_rows, rejects = {}, [], []
    return written, rejected


def _write_chunk(
    out: Path,
    c: int,
    info: dict[str, dict[str, Any]],
    acc: dict[str, list[torch.Tensor]],
    rows: list[int],
    rejects: list[dict[str, Any]],
    fp_hash: str,
) -> None:
    tensors = {"row": torch.tensor(rows, dtype=torch.int64)}
    for s, e in info.items():
        tensors[s] = torch.cat(acc[s]) if s in acc else torch.empty(0, e["dim"])
        if e["patch_tokens"]:
            key = f"{s}_patches"
            tensors[key] = torch.cat(acc[key]) if key in acc else torch.empty(0, 0, e["dim"], dtype=torch.float16)
    atomic_save_tensors(_chunk_path(out, c), tensors, {"fingerprint": fp_hash, "rejects": json.dumps(rejects)})


def assemble(
    cfg: ExtractConfig, items: list[Item], info: dict[str, dict[str, Any]], fp: dict[str, Any], fp_hash: str,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Concatenate the chunks into the final per-stream arrays, ids and rejects; the manifest is written last."""
    out = Path(cfg.out)
    n_chunks = -(-len(items) // cfg.chunk_size)
    paths = [_chunk_path(out, c) for c in range(n_chunks)]
    missing = [p.name for p in paths if not _chunk_done(p, fp_hash)]
    if missing:
        raise ExtractError(f"{out}: {len(missing)} chunks are missing or torn ({missing[0]}, ...); run the same command again")
    rows, rejects, shapes = [], [], {}
    for p in paths:
        with safe_open(str(p), "pt") as f:
            rows.append(f.get_tensor("row").numpy())
            rejects.extend(json.loads(f.metadata()["rejects"]))
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if key != "row" and shape[0]:
                    shapes.setdefault(key, shape[1:])
    rows_all = np.concatenate(rows)
    n = len(rows_all)
    every = np.sort(np.concatenate([rows_all, np.array([r["row"] for r in rejects], dtype=np.int64)]))
    if not np.array_equal(every, np.arange(len(items))):  # every row exactly once, written or rejected
        raise ExtractError(f"{out}: the chunks do not hold every row exactly once; delete {out / CHUNKS} and run again")
    if n == 0:
        raise ExtractError(f"every image was rejected; see the warnings (first: {rejects[0]['error'] if rejects else '?'})")
    files = {}
    for key, shape in shapes.items():
        dtype = np.float16 if key.endswith("_patches") else np.float32
        final = out / f"{key}.npy"
        with atomic_path(final) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, *shape))
            at = 0
            for p in paths:
                with safe_open(str(p), "np") as f:
                    block = f.get_tensor(key)
                arr[at : at + len(block)] = block
                at += len(block)
            arr.flush()
            del arr
        files[key] = final.name
    atomic_write_bytes(out / "ids.txt", "".join(items[i].id + "\n" for i in rows_all).encode())
    atomic_write_bytes(out / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects).encode())
    manifest = {
        "format": "sparc-features",
        "version": 1,
        "rows": n,
        "rejected": len(rejects),
        "captions": str(Path(cfg.captions).resolve()),
        "streams": {
            s: {"file": files[s], "dim": e["dim"], "encoder": e["name"], "modality": e["modality"]} for s, e in info.items()
        },
        "extra_files": {k: v for k, v in files.items() if k not in info},
        "ids": "ids.txt",
        "rejects": "rejects.jsonl",
        "fingerprint": fp_hash,
        "settings": fp,
        "engine": engine or {"name": "local"},  # what ran the last pass (a rerun's pass covers what was left)
    }
    atomic_write_json(out / MANIFEST, manifest)
    if not cfg.keep_chunks:
        shutil.rmtree(out / CHUNKS, ignore_errors=True)
    return manifest
