"""Pictures of heatmaps, word scores and pairs as PNG bytes; the ``save_*`` helpers write them atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pairs import PairExplanation
from .targets import HEATMAP_PNG_SIZE, Heatmap, Target
from .text import WordScores


def save_pair_png(pair: PairExplanation, path: str | Path) -> Path:
    """``pair_png`` written atomically to ``path``."""
    return _write(path, pair_png(pair))


def pair_png(pair: PairExplanation) -> bytes:
    """One row per shared latent: its heatmap over the image, and the caption with words shaded by score
    (PNG bytes)."""
    rows = max(1, len(pair.concepts))
    fig = _figure(9, 2.4 * rows)
    if not pair.concepts:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "the image and the caption share no agreed latent", ha="center", va="center")
    for r, c in enumerate(pair.concepts):
        ax = fig.add_subplot(rows, 2, 2 * r + 1)
        ax.imshow(c.heatmap.image)
        ax.imshow(c.heatmap.upsampled, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        name = c.heatmap.names.get(c.latent, "")
        ax.set_title(f"latent {c.latent}" + (f" '{name}'" if name else ""), fontsize=9, parse_math=False)
        ax.axis("off")
        tx = fig.add_subplot(rows, 2, 2 * r + 2)
        tx.axis("off")
        _word_strip(fig, tx, c.words.words, c.words.scores, fontsize=11)
    fig.suptitle(f"{pair.stream}: what the image and the caption share", fontsize=10)
    return _png(fig)


# ---- pictures ----------------------------------------------------------------------------------------------
def _title(target: Target, names: dict[int, str], activations: dict[int, float] | None = None, n: int = 4) -> str:
    parts = []
    for i, w in list(zip(target.latents, target.weights))[:n]:
        label = f"{i}" + (f" '{names[i]}'" if names.get(i) else "")
        parts.append(f"{label} w={w:.2f}")
    more = f" +{len(target.latents) - n} more" if len(target.latents) > n else ""
    return "latents " + ", ".join(parts) + more


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure with its own Agg canvas: no pyplot state, safe in the server's worker threads."""
    from ...extras import require

    require("matplotlib", "plots", "pictures (heatmaps, word scores)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, **savefig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    return buf.getvalue()


def _write(path: str | Path, png: bytes) -> Path:
    from ...atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), png)
    return Path(path)


def save_heatmap_png(hm: Heatmap, path: str | Path) -> Path:
    """``heatmap_png`` written atomically to ``path``."""
    return _write(path, heatmap_png(hm))


def heatmap_png(hm: Heatmap) -> bytes:
    """The crop the encoder saw, the heatmap over it (colormap + colorbar), the latents in the title (PNG
    bytes of HEATMAP_PNG_SIZE pixels)."""
    fig = _figure(HEATMAP_PNG_SIZE[0] / 100, HEATMAP_PNG_SIZE[1] / 100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(hm.image)
    im = ax.imshow(hm.upsampled, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="relevance (min 0, max 1)")
    src = f'"{hm.target.source}"' if hm.target.source != "latents" else "chosen latents"
    title = f"{hm.method} on {hm.stream}: {src}\n{_title(hm.target, hm.names)}"
    if not hm.target_fires:
        title += "\n(no target latent fires on this image: empty map)"
    ax.set_title(title, fontsize=8, parse_math=False)  # captions are plain text, never mathtext
    ax.axis("off")
    return _png(fig)


def _word_strip(fig: Any, ax: Any, words: list[str], scores: list[float], fontsize: int = 12) -> None:
    """Words left to right along ``ax``, each on a box shaded by its score (positive: red, negative: blue)."""
    from matplotlib import colormaps

    cmap = colormaps["bwr"]
    renderer = fig.canvas.get_renderer()
    x = 0.01
    for word, s in zip(words, scores):
        t = ax.text(
            x, 0.45, word, fontsize=fontsize, transform=ax.transAxes, va="center", parse_math=False,
            bbox={"facecolor": cmap(0.5 + 0.5 * s), "edgecolor": "none", "boxstyle": "round,pad=0.2"},
        )  # fmt: skip
        bb = t.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
        x = bb.x1 + 0.012


def save_words_png(ws: WordScores, path: str | Path, names: dict[int, str] | None = None) -> Path:
    """``words_png`` written atomically to ``path``."""
    return _write(path, words_png(ws, names))


def words_png(ws: WordScores, names: dict[int, str] | None = None) -> bytes:
    """The caption as a strip of words shaded by their score (positive: red, negative: blue; PNG bytes)."""
    width = max(4.0, 0.16 * sum(len(w) + 2 for w in ws.words))
    fig = _figure(min(width, 24), 1.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    _word_strip(fig, ax, ws.words, ws.scores)
    ax.set_title(f"{ws.method} attribution: {_title(ws.target, names or {})}", fontsize=8, parse_math=False)
    return _png(fig, bbox_inches="tight")
