"""Named latents: each latent gets the words or phrases of a vocabulary that activate it most.

A vocabulary (a word list, or the captions of an extraction) is encoded by a text stream (CLIP text tower)
into the shared code; each latent's name is the entry with the largest value of that latent in its code,
followed by the runners-up. Since latent i means the same concept in every stream, the name holds for DINO
and CLIP image codes too. The result is written beside the checkpoint as ``latent_names.json`` (atomically,
with the checkpoint's hash inside, so names of another model are never shown).

On planted-concept worlds the truth is known: :func:`naming_score` is the fraction of latents whose top name
is the concept that fires them, the firing read from ANOTHER stream's codes (names from the text tower must
hold for DINO): a model whose latents do not mean the same thing across streams names at chance.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_json
from ..checkpoint import checkpoint_hash
from ..config import SparcError
from ..model import SparcModel

NAMES_FILE = "latent_names.json"


class NamingError(SparcError, ValueError):
    """Names that cannot be computed or read; the message says why."""


def name_latents(
    model: SparcModel, stream: str, vectors: np.ndarray | torch.Tensor, names: list[str], top: int = 5, batch: int = 4096
) -> dict[int, list[tuple[str, float]]]:
    """Per latent, up to ``top`` (name, value) of the vocabulary entries whose code holds it most strongly.

    ``vectors`` [V, d] are the entries' features in ``stream``; latents no entry activates are left out.
    """
    x = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2 or len(x) != len(names):
        raise NamingError(f"need one feature row per vocabulary entry: {tuple(x.shape)} rows vs {len(names)} names")
    if stream not in model.streams:
        raise NamingError(f"the checkpoint has no stream {stream!r} (it has {model.streams})")
    heaps: dict[int, list[tuple[float, int]]] = {}
    with torch.no_grad():
        for a in range(0, len(x), batch):
            code = model.encode({stream: x[a : a + batch].to(model.device)}, code="agreed")
            idx, val = code.indices.cpu().numpy(), code.values.float().cpu().numpy()
            rows, cols = np.nonzero(val > 0)
            for r, c in zip(rows.tolist(), cols.tolist()):
                h = heaps.setdefault(int(idx[r, c]), [])
                item = (float(val[r, c]), a + r)
                if len(h) < top:
                    heapq.heappush(h, item)
                elif item > h[0]:
                    heapq.heapreplace(h, item)
    return {lat: [(names[i], v) for v, i in sorted(h, reverse=True)] for lat, h in sorted(heaps.items())}


def write_latent_names(
    checkpoint: str | Path, named: dict[int, list[tuple[str, float]]], vocab: str, stream: str, n_latents: int
) -> Path:
    """Write ``latent_names.json`` beside the checkpoint's versions (atomically, with its hash)."""
    out = Path(checkpoint) / NAMES_FILE
    atomic_write_json(
        out,
        {
            "checkpoint_sha256": checkpoint_hash(checkpoint),
            "vocab": vocab,
            "stream": stream,
            "n_latents": n_latents,
            "named": len(named),
            "latents": {str(k): [{"name": n, "score": round(v, 6)} for n, v in lst] for k, lst in named.items()},
        },
    )
    return out


def load_latent_names(checkpoint: str | Path) -> dict[int, str]:
    """latent -> top name from ``latent_names.json``; {} when there is none or it names another checkpoint."""
    import json

    f = Path(checkpoint) / NAMES_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
        if data.get("checkpoint_sha256") != checkpoint_hash(checkpoint):
            return {}  # written for another version of the model: stale
        return {int(k): v[0]["name"] for k, v in data.get("latents", {}).items() if v}
    except (ValueError, KeyError, TypeError, IndexError):
        return {}


def latents_named(names: dict[int, str], concept: str) -> list[int]:
    """The latents whose top name is ``concept`` (case and surrounding space ignored), as in the paper's
    Figure 1 ("bus"); a NamingError lists some names when none matches or there are no names."""
    if not names:
        raise NamingError("this checkpoint has no latent names: run `sparc name-latents` first")
    want = concept.strip().lower()
    found = sorted(i for i, n in names.items() if n.strip().lower() == want)
    if not found:
        close = sorted({n for n in names.values() if want and (want in n.lower() or n.lower() in want)})[:8]
        hint = f"; names containing it: {close}" if close else ""
        raise NamingError(f"no latent is named {concept!r} ({len(names)} named latents){hint}")
    return found


def naming_score(
    named: dict[int, list[tuple[str, float]]], codes_idx: np.ndarray, codes_val: np.ndarray, labels: np.ndarray, names: list[str]
) -> dict[str, float]:
    """How often a latent's top name is the planted concept that fires it.

    The concept that fires latent i: among samples where i is active, the concept present most often relative
    to its overall frequency (the largest lift P(concept | i active) / P(concept)). Scored over latents that
    are active on the samples and named.
    """
    n, c = labels.shape
    present = labels.astype(bool)
    base = present.mean(0).clip(1e-9)
    fired: dict[int, list[int]] = {}
    rows, cols = np.nonzero(codes_val > 0)
    for r, k in zip(rows.tolist(), cols.tolist()):
        fired.setdefault(int(codes_idx[r, k]), []).append(r)
    hits = total = 0
    for lat, samples in fired.items():
        if lat not in named or len(samples) < 5:
            continue
        lift = present[samples].mean(0) / base
        truth = names[int(lift.argmax())]
        hits += named[lat][0][0] == truth
        total += 1
    return {"top1": hits / max(total, 1), "scored_latents": float(total), "active_latents": float(len(fired))}


def _read_vocab(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise NamingError(f"{p}: vocabulary file not found")
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        from ..extract import read_captions

        entries = sorted({item.caption for item in read_captions(p, all_captions=True)})
    else:
        entries = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    entries = list(dict.fromkeys(entries))
    if not entries:
        raise NamingError(f"{p}: no vocabulary entries (one word or phrase per line, or a captions file)")
    return entries


__all__ = ["NAMES_FILE", "NamingError", "load_latent_names", "name_latents", "naming_score", "write_latent_names"]
