"""The embedded default job: planted-concept data -> SPARC defaults, the paper's recipe, Local TopK -> one report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_json
from ..checkpoint import CheckpointError, read_checkpoint_config
from ..config import SynthConfig, TrainConfig
from ..metrics import evaluate
from ..report import format_report
from .alignment import LOCAL, PAPER

DEMO_SYNTH = SynthConfig(n_train=30_000, n_eval=5_000)
DEMO_MODEL = {"n_latents": 384, "k": 32, "steps": 2000, "batch_size": 256}
# Three columns: the shipped defaults, the paper's recipe (Global TopK + cross-reconstruction only), and
# Local TopK without cross-reconstruction, so the gain of every addition is visible.
RUNS = {
    "SPARC defaults": ("sparc", {}),
    "paper recipe (global, lambda=1)": ("paper", PAPER),
    "Local TopK (lambda=0)": ("baseline", LOCAL),
}


def _trained(out: Path, steps: int) -> bool:
    try:
        return int(read_checkpoint_config(out).get("step", -1)) >= steps
    except CheckpointError:
        return False


def demo_paths(out: str | Path) -> dict[str, Path]:
    """Where the demo keeps its data, checkpoints and report."""
    root = Path(out)
    return {
        "data": root / "data",
        "sparc": root / "sparc",
        "paper": root / "paper",
        "baseline": root / "baseline",
        "report": root / "report.json",
    }


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Synthesise, train both models (reusing finished checkpoints), evaluate, print and save the report."""
    from ..checkpoint import load_checkpoint
    from ..train import train
    from .synthetic import write_synthetic

    paths = demo_paths(out)
    streams = list(DEMO_SYNTH.streams)
    if not (paths["data"] / "synth.json").is_file():
        print(f"[1/5] synthesising planted-concept data -> {paths['data']}")
        write_synthetic(DEMO_SYNTH, paths["data"])
    else:
        print(f"[1/5] reusing data in {paths['data']}")
    train_feats = {s: str(paths["data"] / "train" / f"{s}.npy") for s in streams}
    labels = str(paths["data"] / "train" / "labels.npy")
    n_steps = steps or DEMO_MODEL["steps"]
    runs = RUNS
    for i, (title, (key, extra)) in enumerate(runs.items(), start=2):
        if _trained(paths[key], n_steps):
            print(f"[{i}/5] reusing trained {title} in {paths[key]}")
            continue
        print(f"[{i}/5] training {title} for {n_steps} steps on CPU -> {paths[key]}")
        cfg = TrainConfig(
            features=train_feats,
            labels=labels,
            out=str(paths[key]),
            progress=progress,
            **(DEMO_MODEL | {"steps": n_steps, "eval_every": max(1, n_steps // 5), "save_every": n_steps} | extra),
        )
        train(cfg, overwrite=True)  # the demo's own directory: an unfinished run starts over
    print("[5/5] evaluating on held-out data, each stream encoded alone")
    eval_feats = {s: np.load(paths["data"] / "eval" / f"{s}.npy") for s in streams}
    eval_labels = np.load(paths["data"] / "eval" / "labels.npy")
    reports = {}
    for title, (key, _) in runs.items():
        reports[title] = evaluate(load_checkpoint(paths[key]), eval_feats, labels=eval_labels, gallery=2000)
    atomic_write_json(paths["report"], reports)
    print()
    print(format_report(reports))
    concepts = write_demo_concepts(paths, eval_feats, eval_labels)
    print(f"\nreport: {paths['report']}\ntraining curves: {paths['sparc'] / 'training_curves.png'}")
    print(f"concept report (open in a browser): {concepts}")
    return reports


def write_demo_concepts(paths: dict[str, Path], feats: dict[str, np.ndarray], labels: np.ndarray) -> Path:
    """Name the demo model's latents after the planted concepts (each concept's CLIP-text vector alone) and
    write the concept report over the held-out DINO and CLIP-image codes."""
    import torch

    from ..checkpoint import load_checkpoint
    from ..explain.concept_report import CodeSet, firing_rates, write_concept_report
    from ..explain.naming import name_latents, naming_score, write_latent_names
    from .synthetic import PlantedConcepts

    model = load_checkpoint(paths["sparc"])
    world = PlantedConcepts(DEMO_SYNTH)
    concept_names = [f"concept-{c}" for c in range(DEMO_SYNTH.n_concepts)]
    named = name_latents(model, "clip_txt", world.concept_vectors("clip_txt"), concept_names)
    write_latent_names(paths["sparc"], named, "planted concepts (synthetic world)", "clip_txt", model.n_latents)
    codes = {s: model.encode({s: torch.from_numpy(x)}, code="agreed") for s, x in feats.items()}
    score = naming_score(named, codes["dino"].indices.numpy(), codes["dino"].values.numpy(), labels, concept_names)
    print(
        f"named latents: {score['top1']:.1%} of {int(score['scored_latents'])} latents active on DINO are named "
        "after the planted concept that fires them (names read from the CLIP-text tower)"
    )
    rates = {s: firing_rates(c.indices.numpy(), c.values.numpy(), model.n_latents) for s, c in codes.items()}
    caption = {i: "concepts " + ", ".join(map(str, np.flatnonzero(row)[:8])) for i, row in enumerate(labels[:5000])}
    galleries = [
        CodeSet(f"held-out {s}", s, codes[s].indices.numpy(), codes[s].values.numpy(), list(range(len(labels))), caption)
        for s in ("dino", "clip_img")
    ]
    return write_concept_report(
        paths["sparc"].parent / "concepts", model.n_latents, rates, galleries, named, title="sparc demo: concepts"
    )
