"""Planted-concept generator: paired streams whose ground-truth concepts are known.

Each sample holds a few concepts (Zipf-like frequencies, random magnitudes). Every stream sees the
concepts it can see through its own random linear mixing into its dims, plus noise and a fixed
per-stream offset (CLIP's "modality gap"); CLIP-like streams get unit-norm rows, the others a large
raw scale, as DINOv2 features have. Most concepts are visible to every stream, some to a subset only.
A world can add a concept hierarchy, visibility groups, a correlated text tower, unpaired nuisance
variation and per-stream magnitudes (SynthConfig); ``PRESETS`` names a few. Since the generator knows
which concepts each stream can see, the ceiling of one-stream agreement is known for every world.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_save_npy, atomic_write_json
from ..config import SYNTH_PRESETS, ConfigError, SynthConfig

# Named worlds for `sparc synth --preset` and the alignment benchmark: each differs from the demo's
# world in one or two ways a real pair of models differs (more concepts than latents, concepts only
# some streams see, hierarchies, a correlated text tower, unpaired nuisance variation).
PRESETS = SYNTH_PRESETS  # the named worlds live in config (no torch needed to list them)


def preset(name: str, **overrides) -> SynthConfig:
    """The SynthConfig of a named world, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown world preset {name!r}; presets are {sorted(PRESETS)}")
    return SynthConfig(**(PRESETS[name] | overrides))


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)


class PlantedConcepts:
    """The fixed world (concept frequencies, visibility, hierarchy, per-stream mixing) samples are drawn from."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        c = cfg.n_concepts
        streams = list(cfg.streams)
        freq = 1.0 / np.arange(1, c + 1) ** cfg.zipf_exponent
        self.freq = freq / freq.sum()
        self.visible = np.ones((len(streams), c), dtype=bool)
        if not cfg.visibility:
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
            self.mixing[s] = _unit_rows(rng.standard_normal((c, d)))
            o = rng.standard_normal(d).astype(np.float32)
            self.offset[s] = o / np.linalg.norm(o)
        # Everything below draws from its own generator, so adding a world feature leaves the others alone.
        extra = np.random.default_rng([cfg.seed, 17])
        if cfg.visibility:
            order = extra.permutation(c)
            start = 0
            for group, share in cfg.visibility.items():
                members = order[start : start + int(round(share * c))]
                start += len(members)
                self.visible[:, members] = False
                self.visible[[streams.index(n) for n in group.split("+")], members[:, None]] = True
        # Hierarchy: a child's direction shares child_similarity with its parent's in every stream, and
        # a sample that holds a child also holds its parent (a terrier is a dog).
        self.parent = np.full(c, -1, dtype=np.int64)
        n_children = int(round(cfg.hierarchy * c))
        if n_children:
            children = extra.choice(np.arange(1, c), size=min(n_children, c - 1), replace=False)
            roots = np.setdiff1d(np.arange(c), children)
            for child in np.sort(children):  # parents are commoner (lower rank) roots where possible
                cands = roots[roots < child]
                self.parent[child] = extra.choice(cands if len(cands) else roots)
            a = cfg.child_similarity
            for s in streams:
                m = self.mixing[s]
                kids = np.flatnonzero(self.parent >= 0)
                m[kids] = _unit_rows(a * m[self.parent[kids]] + np.sqrt(1 - a * a) * m[kids])
        if cfg.tower_correlation > 0:
            a = cfg.tower_correlation
            head = self.mixing[cfg.towers[0]]
            for t in cfg.towers[1:]:
                self.mixing[t] = _unit_rows(a * head + np.sqrt(1 - a * a) * self.mixing[t])
        self.nuisance = {}
        for s, d in cfg.streams.items():
            if cfg.nuisance_dims:
                q, _ = np.linalg.qr(extra.standard_normal((d, cfg.nuisance_dims)))
                self.nuisance[s] = q.T.astype(np.float32)

    def concept_vectors(self, stream: str) -> np.ndarray:
        """[n_concepts, d]: each concept alone, as ``stream`` sees it (no noise, no nuisance; the offset and
        the stream's scaling as in ``sample``). Concepts the stream cannot see come out as the offset only."""
        cfg = self.cfg
        i = list(cfg.streams).index(stream)
        x = self.mixing[stream] * self.visible[i][:, None] + self.offset[stream] * cfg.modality_gap
        if stream in cfg.unit_norm:
            return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)).astype(np.float32)
        return (x * cfg.raw_scale / np.linalg.norm(x, axis=1).mean()).astype(np.float32)

    def visible_labels(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Per stream, [n, n_concepts] bool: the concepts of each sample that stream can see."""
        return {s: labels.astype(bool) & self.visible[i] for i, s in enumerate(self.cfg.streams)}

    def sample(self, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``n`` paired samples: per-stream float32 features [n, d] and uint8 concept labels [n, n_concepts]."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, seed])
        c = cfg.n_concepts
        cap = cfg.max_concepts_per_sample or 4 * int(cfg.concepts_per_sample) + 4
        counts = np.clip(rng.poisson(cfg.concepts_per_sample, size=n), 1, min(c, cap))
        # Distinct concepts weighted by frequency: Gumbel top-m on log-frequencies.
        keys = np.log(self.freq)[None, :] + rng.gumbel(size=(n, c))
        m = int(counts.max())
        order = np.argpartition(-keys, m - 1, axis=1)[:, :m] if m < c else np.tile(np.arange(c), (n, 1))
        order = np.take_along_axis(order, np.argsort(-np.take_along_axis(keys, order, 1), axis=1), 1)
        take = np.arange(order.shape[1])[None, :] < counts[:, None]
        present = np.zeros((n, c), dtype=bool)
        rows = np.repeat(np.arange(n), take.sum(1))
        present[rows, order[take]] = True
        kids = np.flatnonzero(self.parent >= 0)
        if len(kids):
            r, j = np.nonzero(present[:, kids])
            present[r, self.parent[kids[j]]] = True
        labels = present.astype(np.uint8)
        shared = np.where(present, rng.uniform(0.5, 1.5, size=(n, c)), 0.0).astype(np.float32)
        out = {}
        for i, (s, d) in enumerate(cfg.streams.items()):
            amounts = shared if cfg.magnitudes == "shared" else np.where(present, rng.uniform(0.5, 1.5, size=(n, c)), 0)
            signal = (amounts * self.visible[i]).astype(np.float32) @ self.mixing[s]
            norm = np.linalg.norm(signal, axis=1, keepdims=True)
            mean_norm = float(norm.mean())
            noise = rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d) * cfg.noise * np.maximum(norm, 1e-3)
            x = signal + noise + self.offset[s] * cfg.modality_gap * mean_norm
            if s in self.nuisance:
                r = self.nuisance[s].shape[0]
                coef = rng.standard_normal((n, r)).astype(np.float32) / np.sqrt(r)
                x = x + (coef @ self.nuisance[s]) * cfg.nuisance_scale * np.maximum(norm, 1e-3)
            if s in cfg.unit_norm:
                x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-8)
            else:
                x *= cfg.raw_scale / np.linalg.norm(x, axis=1).mean()
            out[s] = x.astype(np.float32)
        return out, labels


def visible_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Jaccard of two [n, n_concepts] bool concept sets (1 where both are empty)."""
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def ceiling(world: PlantedConcepts, labels: np.ndarray) -> dict[str, float]:
    """Per ordered stream pair "s->t", the best one-stream agreement this world allows on these samples."""
    vis = world.visible_labels(labels)
    return {f"{s}->{t}": visible_jaccard(vis[s], vis[t]) for s in vis for t in vis if s != t}


def write_synthetic(cfg: SynthConfig, out: str | Path) -> dict[str, dict[str, str]]:
    """Write train/ and eval/ splits (one .npy per stream + labels.npy) and synth.json; returns the paths."""
    out = Path(out)
    world = PlantedConcepts(cfg)
    paths: dict[str, dict[str, str]] = {}
    ceilings: dict[str, dict[str, float]] = {}
    for split, n, seed in (("train", cfg.n_train, 1), ("eval", cfg.n_eval, 2)):
        if n == 0:
            continue
        feats, labels = world.sample(n, seed)
        paths[split] = {}
        for s, x in feats.items():
            p = out / split / f"{s}.npy"
            atomic_save_npy(p, x)
            paths[split][s] = str(p)
        atomic_save_npy(out / split / "labels.npy", labels)
        ceilings[split] = ceiling(world, labels)
        paths[split]["labels"] = str(out / split / "labels.npy")
    atomic_save_npy(out / "visibility.npy", world.visible)
    meta = {
        "config": cfg.model_dump(),
        "visible_to_all": int(world.visible.all(0).sum()),
        "visible_to_subset": int((~world.visible.all(0)).sum()),
        "children": int((world.parent >= 0).sum()),
        "ceiling": ceilings,  # per split and stream pair: Jaccard of the concept sets each stream sees
        "paths": paths,
    }
    atomic_write_json(out / "synth.json", meta)
    return paths


# Dense codes, as real CLIP/DINO features give: many concepts per sample, far more concepts than k (the
# index benchmarks' world).
INDEX_WORLD = preset("many", n_concepts=8000, concepts_per_sample=72.0, tower_correlation=0.5, n_train=60_000, n_eval=0, seed=5)


def index_gallery(n: int, out: Path, chunk: int = 10_000) -> tuple[Path, np.ndarray, np.ndarray]:
    """A gallery of ``INDEX_WORLD``: DINO features (``out/dino.npy``, a memmap), raw CLIP image features, and
    the CLIP-text queries of items 0..1023 (bench/index_search.py, bench/service_load.py)."""
    world = PlantedConcepts(INDEX_WORLD)
    dims = INDEX_WORLD.streams
    GALLERY, QUERY, RAW_GALLERY, N_QUERIES = "dino", "clip_txt", "clip_img", 1024
    gal = np.lib.format.open_memmap(out / f"{GALLERY}.npy", mode="w+", dtype=np.float32, shape=(n, dims[GALLERY]))
    raw = np.empty((n, dims[RAW_GALLERY]), dtype=np.float32)
    queries = None
    for i, a in enumerate(range(0, n, chunk)):
        b = min(n, a + chunk)
        feats, _ = world.sample(b - a, seed=1000 + i)
        gal[a:b], raw[a:b] = feats[GALLERY], feats[RAW_GALLERY]
        if a == 0:
            queries = feats[QUERY][:N_QUERIES]
    gal.flush()
    return out / f"{GALLERY}.npy", raw, np.asarray(queries)
