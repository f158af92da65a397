"""A static HTML concept report: per latent its names, how often each stream fires it, and its top items.

One page (``index.html``) plus pictures, opened straight from disk (no server): an overview plot of each
latent's firing rate per stream (shared latents fire in several streams, private ones in one), then one card
per latent with its names, per-stream rates and, per gallery, the items holding it most strongly (image
thumbnails when the images are known, captions when known, otherwise ids). Written into a temp folder and
switched into place, so a kill never leaves half a report.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import replace_dir

SHARED_RATE = 1e-3  # a latent counts as firing in a stream above this rate


@dataclass
class CodeSet:
    """A set of stored codes (a gallery's, a split's) (indices/values [n, k]) and what is known about its items."""

    name: str
    stream: str
    codes_idx: np.ndarray
    codes_val: np.ndarray
    ids: list
    captions: dict = field(default_factory=dict)  # id -> caption
    images: dict = field(default_factory=dict)  # id -> image file


def firing_rates(codes_idx: np.ndarray, codes_val: np.ndarray, n_latents: int) -> np.ndarray:
    """Fraction of rows on which each latent is active."""
    active = np.asarray(codes_val) > 0
    counts = np.bincount(np.asarray(codes_idx)[active].ravel(), minlength=n_latents)
    return counts / max(len(codes_idx), 1)


def shown_latents(rates: dict[str, np.ndarray], max_latents: int) -> list[int]:
    """The latents a report shows: the ``max_latents`` with the highest rate in any stream (that fire)."""
    best = np.max(np.stack(list(rates.values())), 0)
    return [int(i) for i in np.argsort(-best, kind="stable")[:max_latents] if best[i] > 0]


def top_items(g: CodeSet, n_latents: int, top: int) -> dict[int, list[tuple[int, float]]]:
    """latent -> [(row, value)] best first."""
    idx, val = np.asarray(g.codes_idx), np.asarray(g.codes_val, dtype=np.float32)
    rows, cols = np.nonzero(val > 0)
    lat = idx[rows, cols]
    v = val[rows, cols]
    order = np.lexsort((-v, lat))
    out: dict[int, list[tuple[int, float]]] = {}
    for o in order.tolist():
        lst = out.setdefault(int(lat[o]), [])
        if len(lst) < top:
            lst.append((int(rows[o]), float(v[o])))
    return out


def _overview_png(rates: dict[str, np.ndarray], shown: list[int], path: Path) -> dict[str, int]:
    from ..extras import require

    matplotlib = require("matplotlib", "plots", "concept reports")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(rates)
    mat = np.stack([rates[s] for s in streams])  # [S, L]
    fires = mat > SHARED_RATE
    kinds = {"shared (all streams)": int(fires.all(0).sum()), "some streams": 0, "one stream only": 0, "never": 0}
    kinds["one stream only"] = int((fires.sum(0) == 1).sum())
    kinds["never"] = int((fires.sum(0) == 0).sum())
    kinds["some streams"] = int(mat.shape[1] - sum(v for k, v in kinds.items() if k != "some streams"))
    order = np.argsort(-mat.max(0))
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    for s, row in zip(streams, mat):
        ax.plot(np.arange(len(order)), np.maximum(row[order], 1e-5), ".", ms=2, label=s)
    ax.set_yscale("log")
    ax.set_xlabel("latent (sorted by its highest rate)")
    ax.set_ylabel("firing rate")
    ax.set_title(", ".join(f"{k}: {v}" for k, v in kinds.items()), fontsize=8)
    ax.legend(markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return kinds


def _thumb(src: Path, dest: Path, size: int = 96) -> bool:
    from PIL import Image

    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            im.save(dest, format="JPEG", quality=85)
        return True
    except (OSError, ValueError):
        return False


def write_concept_report(
    out: str | Path,
    n_latents: int,
    rates: dict[str, np.ndarray],
    galleries: list[CodeSet],
    names: dict[int, list[tuple[str, float]]] | None = None,
    title: str = "SPARC concepts",
    max_latents: int = 200,
    top_items_n: int = 8,
    heatmaps: dict[int, list[Path]] | None = None,
) -> Path:
    """Write the report folder ``out`` (index.html + pictures) and return the path of index.html.

    rates: stream -> [n_latents] firing rate; the latents shown are the ``max_latents`` with the highest rate
    in any stream. heatmaps: latent -> PNG files to show on its card (made by the caller, e.g. localize).
    """
    out = Path(out)
    names = names or {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "thumbs").mkdir()
        kinds = _overview_png(rates, [], tmp / "overview.png")
        shown = shown_latents(rates, max_latents)
        tops = {g.name: top_items(g, n_latents, top_items_n) for g in galleries}
        e = html.escape
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{e(title)}</title><style>",
            "body{font-family:sans-serif;margin:20px;color:#222} .latent{border:1px solid #ccc;border-radius:6px;"
            "padding:8px 12px;margin:10px 0} .items{display:flex;flex-wrap:wrap;gap:8px} .item{width:110px;"
            "font-size:11px;word-wrap:break-word} .rates span{margin-right:12px} h2{margin:4px 0;font-size:16px}"
            " .name{color:#a33} img.thumb{width:96px;height:96px;object-fit:cover;display:block}",
            "</style></head><body>",
            f"<h1>{e(title)}</h1>",
            f"<p id='summary'>{n_latents} latents; shown: the {len(shown)} that fire most. "
            + "; ".join(f"{e(k)}: {v}" for k, v in kinds.items())
            + "</p>",
            "<img id='overview' src='overview.png' alt='firing rate of every latent per stream'>",
        ]
        for lat in shown:
            nm = names.get(lat, [])
            label = f" <span class='name'>{e(nm[0][0])}</span>" if nm else ""
            parts.append(f"<div class='latent' id='latent-{lat}'><h2>latent {lat}{label}</h2>")
            if len(nm) > 1:
                parts.append("<div class='names'>also: " + ", ".join(e(n) for n, _ in nm[1:]) + "</div>")
            parts.append(
                "<div class='rates'>" + "".join(f"<span>{e(s)}: {100 * r[lat]:.2f}%</span>" for s, r in rates.items()) + "</div>"
            )
            for path in (heatmaps or {}).get(lat, []):
                dest = tmp / "thumbs" / f"heat-{lat}-{Path(path).name}"
                shutil.copyfile(path, dest)
                parts.append(f"<img class='heatmap' src='thumbs/{dest.name}' width='280'>")
            for g in galleries:
                items = tops[g.name].get(lat, [])
                if not items:
                    continue
                parts.append(f"<div>top items of <b>{e(g.name)}</b> ({e(g.stream)}):</div><div class='items'>")
                for row, v in items:
                    item_id = g.ids[row]
                    cell = ""
                    src = g.images.get(item_id)
                    if src is not None:
                        name = f"{e(g.name)}-{row}.jpg".replace("/", "_")
                        if (tmp / "thumbs" / name).exists() or _thumb(Path(src), tmp / "thumbs" / name):
                            cell += f"<img class='thumb' src='thumbs/{name}' alt='{e(str(item_id))}'>"
                    caption = g.captions.get(item_id)
                    cell += f"<div>{e(str(item_id))} ({v:.2f})</div>"
                    if caption:
                        cell += f"<div class='caption'>{e(caption)}</div>"
                    parts.append(f"<div class='item'>{cell}</div>")
                parts.append("</div>")
            parts.append("</div>")
        parts.append("</body></html>")
        (tmp / "index.html").write_text("\n".join(parts), encoding="utf-8")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


__all__ = ["CodeSet", "firing_rates", "shown_latents", "top_items", "write_concept_report"]


def __getattr__(name: str) -> object:
    if name == "Gallery":  # the earlier name (index.Gallery is the search protocol)
        warnings.warn("sparc_core.explain.concept_report.Gallery is now called CodeSet", DeprecationWarning, stacklevel=2)
        return CodeSet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
