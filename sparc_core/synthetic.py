"""Planted-concept generator: paired streams whose ground-truth concepts are known.

Each sample holds a few concepts (Zipf-like frequencies, random magnitudes). Every stream sees the
concepts it can see through its own random linear mixing into its dims, plus noise and a fixed
per-stream offset (CLIP's "modality gap"); CLIP-like streams get unit-norm rows, the others a large
raw scale, as DINOv2 features have. Most concepts are visible to every stream, some to a subset only.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_bytes, atomic_write_json
from .config import SynthConfig


class PlantedConcepts:
    """The fixed world (concept frequencies, visibility, per-stream mixing) that samples are drawn from."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        c = cfg.n_concepts
        freq = 1.0 / np.arange(1, c + 1) ** cfg.zipf_exponent
        self.freq = freq / freq.sum()
        streams = list(cfg.streams)
        self.visible = np.ones((len(streams), c), dtype=bool)
        n_private = int(round(c * (1 - cfg.shared_fraction))) if len(streams) > 1 else 0
        private = rng.choice(c, size=n_private, replace=False)
        for concept in private:
            size = rng.integers(1, len(streams))  # a proper, non-empty subset of the streams
            seen = rng.choice(len(streams), size=size, replace=False)
            self.visible[:, concept] = False
            self.visible[seen, concept] = True
        self.mixing = {}
        self.offset = {}
        for s, d in cfg.streams.items():
            m = rng.standard_normal((c, d)).astype(np.float32)
            self.mixing[s] = m / np.linalg.norm(m, axis=1, keepdims=True)
            o = rng.standard_normal(d).astype(np.float32)
            self.offset[s] = o / np.linalg.norm(o)

    def sample(self, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``n`` paired samples: per-stream float32 features [n, d] and uint8 concept labels [n, n_concepts]."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, seed])
        c = cfg.n_concepts
        counts = np.clip(rng.poisson(cfg.concepts_per_sample, size=n), 1, min(c, 4 * int(cfg.concepts_per_sample) + 4))
        # Distinct concepts weighted by frequency: Gumbel top-m on log-frequencies.
        keys = np.log(self.freq)[None, :] + rng.gumbel(size=(n, c))
        order = np.argsort(-keys, axis=1)[:, : counts.max()]
        take = np.arange(order.shape[1])[None, :] < counts[:, None]
        amounts = np.zeros((n, c), dtype=np.float32)
        rows = np.repeat(np.arange(n), take.sum(1))
        amounts[rows, order[take]] = rng.uniform(0.5, 1.5, size=rows.shape[0]).astype(np.float32)
        labels = (amounts > 0).astype(np.uint8)
        out = {}
        for i, (s, d) in enumerate(cfg.streams.items()):
            signal = (amounts * self.visible[i]) @ self.mixing[s]
            norm = np.linalg.norm(signal, axis=1, keepdims=True)
            mean_norm = float(norm.mean())
            noise = rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d) * cfg.noise * np.maximum(norm, 1e-3)
            x = signal + noise + self.offset[s] * cfg.modality_gap * mean_norm
            if s in cfg.unit_norm:
                x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)
            else:
                x *= cfg.raw_scale / np.linalg.norm(x, axis=1).mean()
            out[s] = x.astype(np.float32)
        return out, labels


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def write_synthetic(cfg: SynthConfig, out: str | Path) -> dict[str, dict[str, str]]:
    """Write train/ and eval/ splits (one .npy per stream + labels.npy) and synth.json; returns the paths."""
    out = Path(out)
    world = PlantedConcepts(cfg)
    paths: dict[str, dict[str, str]] = {}
    for split, n, seed in (("train", cfg.n_train, 1), ("eval", cfg.n_eval, 2)):
        if n == 0:
            continue
        feats, labels = world.sample(n, seed)
        paths[split] = {}
        for s, x in feats.items():
            p = out / split / f"{s}.npy"
            _save_npy(p, x)
            paths[split][s] = str(p)
        _save_npy(out / split / "labels.npy", labels)
        paths[split]["labels"] = str(out / split / "labels.npy")
    meta = {
        "config": cfg.model_dump(),
        "visible_to_all": int(world.visible.all(0).sum()),
        "visible_to_subset": int((~world.visible.all(0)).sum()),
        "paths": paths,
    }
    atomic_write_json(out / "synth.json", meta)
    return paths
