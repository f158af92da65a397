"""Training-curve figure drawn from metrics.jsonl (losses, dead %, per-stream nMSE, validation)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from .atomic import atomic_write_bytes


def plot_training_curves(log_path: str | Path, png_path: str | Path) -> Path | None:
    """Draw the curves in ``log_path`` into ``png_path`` (atomically); None when there is nothing yet, or
    when matplotlib (the ``plots`` extra) is not installed: training never needs it."""
    from .extras import available

    if not available("matplotlib"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_path, png_path = Path(log_path), Path(png_path)
    if not log_path.is_file():
        return None
    records = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    for key in ("loss", "self", "cross", "align", "auxk"):
        ax.plot(steps, [r[key] if r[key] > 0 else float("nan") for r in train], label=key)
    ax.set_yscale("log")
    ax.set_title("training losses")
    ax.legend()
    ax = axes[0, 1]
    for s in train[0]["dead_pct"]:
        ax.plot(steps, [r["dead_pct"][s] for r in train], label=s)
    ax.set_title("dead latents (%)")
    ax.legend()
    ax = axes[1, 0]
    for s in train[0]["nmse"]:
        ax.plot(steps, [r["nmse"][s] for r in train], label=f"train {s}")
    for s in val[0]["streams"] if val else {}:
        ax.plot([r["step"] for r in val], [r["streams"][s]["nmse_self"] for r in val], "o--", label=f"val alone {s}")
    ax.set_yscale("log")
    ax.set_title("self-reconstruction nMSE")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    if val:
        vs = [r["step"] for r in val]
        for key in ("mean_jaccard", "mean_R@1_latent", "mean_R@1_xrecon"):
            ax.plot(vs, [r[key] for r in val], "o-", label=key)
        ax.set_ylim(0, 1)
        ax.legend()
    ax.set_title("validation (each stream encoded alone)")
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return png_path
