"""Rendered scenes: image-caption pairs whose concepts and object masks are known, to measure the product on pixels.

Each image holds 1-4 objects, each a shape x colour x texture of the vocabulary below, at a random position,
size and rotation over a cluttered background; later objects partly occlude earlier ones (every object keeps
at least ``MIN_VISIBLE`` of its pixels). Each caption comes from a small grammar: synonyms, word orders,
spatial relations between two objects, filler words, and sometimes only some of the objects named.

Written as ``sparc extract`` reads real data, plus the ground truth:

    DIR/images/NNNNNN.png     the pictures
    DIR/captions.csv          image_path, caption, id
    DIR/masks/NNNNNN.png      per-pixel instance map (0: background, i + 1: the image's object i, as visible)
    DIR/scenes.jsonl          per image: id, caption, objects (shape, colour, texture, bbox, visible share),
                              which objects the caption names, the spatial relation it states
    DIR/labels.npy            [n, n_concepts] uint8: which concepts (CONCEPTS) each image holds
    DIR/concepts.json         the concept names (the columns of labels.npy) and the vocabulary

Deterministic by seed (image i draws from its own generator), written into a temporary folder that replaces
DIR only once complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .checkpoint import fsync_dir, replace_dir
from .config import SparcError

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "pentagon")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (148, 70, 189),
    "orange": (255, 127, 14),
    "pink": (240, 120, 190),
    "cyan": (23, 190, 207),
}
TEXTURES = ("solid", "striped", "dotted")
CONCEPTS = [*SHAPES, *COLOURS, *TEXTURES]  # the columns of labels.npy
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "pentagon": ("pentagon",),
}
COLOUR_WORDS = {
    "red": ("red", "crimson"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "pink": ("pink",),
    "cyan": ("cyan", "turquoise"),
}
TEXTURE_WORDS = {"solid": ("", "plain", "solid"), "striped": ("striped", "stripy"), "dotted": ("dotted", "spotted")}
FILLERS = ("a photo of", "a picture of", "we can see", "there is", "this image shows", "look at")
TAILS = ("", "", " on a busy background", " in this picture", " here", " in the scene")
MIN_VISIBLE = 0.35  # share of an object's own pixels that later objects may not cover
MAX_OBJECTS = 4


class ScenesError(SparcError, ValueError):
    """A scene request that cannot be rendered (bad size or count, an existing output folder)."""


@dataclass
class SceneObject:
    shape: str
    colour: str
    texture: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the visible pixels
    centre: tuple[float, float]  # x, y of the visible pixels' centroid
    visible: float  # share of the object's own pixels left visible


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The outline of ``shape`` of radius ``r`` around (cx, cy), rotated by ``angle`` radians."""
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif shape == "star":
        pts = [
            ((1.0 if j % 2 == 0 else 0.45) * math.cos(j * math.pi / 5 - math.pi / 2),
             (1.0 if j % 2 == 0 else 0.45) * math.sin(j * math.pi / 5 - math.pi / 2))
            for j in range(10)
        ]  # fmt: skip
    elif shape == "cross":
        a = 0.33
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    elif shape == "diamond":
        pts = [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6, "pentagon": 5}[shape]
        start = math.pi / 4 if shape == "square" else -math.pi / 2
        pts = [(math.cos(start + 2 * math.pi * j / sides), math.sin(start + 2 * math.pi * j / sides)) for j in range(sides)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-contrast gradient with grey clutter (lines and blobs that are no shape of the vocabulary)."""
    base = rng.uniform(90, 170, size=3)
    tilt = rng.uniform(-40, 40, size=3)
    ramp = np.linspace(-0.5, 0.5, size)
    img = base[None, None, :] + ramp[:, None, None] * tilt[None, None, :] + rng.normal(0, 6, (size, size, 3))
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 10))):
        g = int(rng.integers(60, 200))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        if rng.random() < 0.6:
            draw.line([(x0, y0), (x1, y1)], fill=(g, g, g), width=int(rng.integers(1, 3)))
        else:
            r = float(rng.uniform(2, size / 12))
            draw.ellipse([x0 - r, y0 - r * 0.6, x0 + r, y0 + r * 0.6], fill=(g, g, g))
    return np.array(pil)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], texture: str, rng: np.random.Generator) -> None:
    """Fill ``mask`` on ``canvas`` with the colour in the texture (stripes or dots of a darker shade)."""
    size = canvas.shape[0]
    fill = np.empty((size, size, 3), dtype=np.float32)
    fill[:] = colour
    if texture != "solid":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        dark = np.asarray(colour, dtype=np.float32) * 0.45
        if texture == "striped":
            theta = rng.uniform(0, math.pi)
            period = rng.uniform(4.0, 7.0)
            on = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0.2
        else:
            step = rng.uniform(5.0, 8.0)
            ox, oy = rng.uniform(0, step, 2)
            on = (((xx - ox) % step - step / 2) ** 2 + ((yy - oy) % step - step / 2) ** 2) < (step / 4.5) ** 2
        fill[on] = dark
    canvas[mask] = fill[mask].astype(np.uint8)


def _object_phrase(rng: np.random.Generator, o: SceneObject, det: str) -> str:
    shape = str(rng.choice(SHAPE_WORDS[o.shape]))
    colour = str(rng.choice(COLOUR_WORDS[o.colour]))
    texture = str(rng.choice(TEXTURE_WORDS[o.texture]))
    if o.texture != "solid" and rng.random() < 0.3:  # "a red square with stripes"
        return _article(f"{det} {colour} {shape} with {'stripes' if o.texture == 'striped' else 'dots'}")
    return _article(" ".join(w for w in (det, texture, colour, shape) if w))


def _article(phrase: str) -> str:
    """'a orange ...' -> 'an orange ...'."""
    head, _, rest = phrase.partition(" ")
    return f"an {rest}" if head == "a" and rest[:1] in "aeiou" else phrase


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, from the visible centroids."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def caption_for(rng: np.random.Generator, objects: list[SceneObject]) -> tuple[str, list[int], dict | None]:
    """A caption of the scene, the objects it names (indices into ``objects``) and the spatial relation it
    states, if any ({"subject": i, "relation": "above", "object": j})."""
    named = list(range(len(objects)))
    if len(named) > 1 and rng.random() < 0.25:  # some captions leave objects out
        keep = int(rng.integers(1, len(named)))
        named = sorted(rng.choice(named, size=keep, replace=False).tolist())
    order = rng.permutation(named).tolist()
    relation = None
    if len(order) == 2 and rng.random() < 0.6:
        a, b = order
        first, second = _object_phrase(rng, objects[a], "a"), _object_phrase(rng, objects[b], "the")
        relation = {"subject": int(a), "relation": _relation(objects[a], objects[b]), "object": int(b)}
        body = f"{first} {relation['relation']} {second}"
    else:
        phrases = [_object_phrase(rng, objects[i], str(rng.choice(("a", "one")))) for i in order]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    start = str(rng.choice(FILLERS)) + " " if rng.random() < 0.6 else ""
    return f"{start}{body}{rng.choice(TAILS)}".strip(), sorted(named), relation


def render_scene(
    seed: int, index: int, size: int = 112
) -> tuple[Image.Image, np.ndarray, list[SceneObject], str, list[int], dict | None]:
    """Scene ``index`` of the set drawn with ``seed``: (image, [size, size] uint8 instance map, objects,
    caption, indices of the objects the caption names, the relation it states or None)."""
    rng = np.random.default_rng([seed, index])
    canvas = _background(rng, size)
    owner = np.zeros((size, size), dtype=np.uint8)
    own_area: list[int] = []
    specs = []
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    for k in range(n):
        for _ in range(20):  # find a place that leaves every earlier object enough of its pixels
            r = float(rng.uniform(size * 0.09, size * 0.2))
            cx, cy = (float(v) for v in rng.uniform(r * 0.8, size - r * 0.8, 2))
            shape = str(rng.choice(SHAPES))
            pil = Image.new("L", (size, size), 0)
            ImageDraw.Draw(pil).polygon(_polygon(shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), fill=1)
            mask = np.asarray(pil, dtype=bool)
            after = owner.copy()
            after[mask] = k + 1
            if mask.sum() > 0 and all((after == j + 1).sum() >= MIN_VISIBLE * own_area[j] for j in range(k)):
                break
        else:
            break  # no room left: fewer objects
        colour, texture = str(rng.choice(list(COLOURS))), str(rng.choice(TEXTURES))
        _paint(canvas, mask, COLOURS[colour], texture, rng)
        owner = after
        own_area.append(int(mask.sum()))
        specs.append((shape, colour, texture))
    objects = []
    for j, (shape, colour, texture) in enumerate(specs):
        ys, xs = np.nonzero(owner == j + 1)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(shape, colour, texture, bbox, (float(xs.mean()), float(ys.mean())), len(xs) / own_area[j]))
    caption, named, relation = caption_for(rng, objects)
    return Image.fromarray(canvas), owner, objects, caption, named, relation


def concept_labels(objects: list[SceneObject]) -> np.ndarray:
    """[len(CONCEPTS)] uint8: which shapes, colours and textures the scene holds."""
    out = np.zeros(len(CONCEPTS), dtype=np.uint8)
    for o in objects:
        for name in (o.shape, o.colour, o.texture):
            out[CONCEPTS.index(name)] = 1
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_scenes(out: str | Path, n: int, seed: int = 0, size: int = 112, overwrite: bool = False, progress: bool = True) -> Path:
    """Render ``n`` scenes into ``out`` (see the module doc); returns ``out``."""
    out = Path(out)
    if n < 1:
        raise ScenesError(f"--n must be >= 1, got {n}")
    if not 32 <= size <= 1024:
        raise ScenesError(f"--size must be in [32, 1024], got {size}")
    if out.exists() and not overwrite:
        raise ScenesError(f"{out} exists: pick another --out or pass --overwrite")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    labels = np.zeros((n, len(CONCEPTS)), dtype=np.uint8)
    width = max(6, len(str(n - 1)))
    try:
        with open(tmp / "captions.csv", "w", newline="", encoding="utf-8") as cap, open(tmp / "scenes.jsonl", "w") as meta:
            writer = csv.writer(cap)
            writer.writerow(["image_path", "caption", "id"])
            for i in tqdm(range(n), desc="rendering scenes", unit="scene", disable=not progress):
                image, owner, objects, caption, named, relation = render_scene(seed, i, size)
                name = f"{i:0{width}d}"
                (tmp / "images" / f"{name}.png").write_bytes(_png(image))
                (tmp / "masks" / f"{name}.png").write_bytes(_png(Image.fromarray(owner)))
                writer.writerow([f"{name}.png", caption, name])
                record = {"id": name, "caption": caption, "named": named, "relation": relation}
                record["objects"] = [asdict(o) for o in objects]
                meta.write(json.dumps(record) + "\n")
                labels[i] = concept_labels(objects)
        np.save(tmp / "labels.npy", labels, allow_pickle=False)
        vocabulary = {"shapes": SHAPE_WORDS, "colours": COLOUR_WORDS, "textures": TEXTURE_WORDS}
        (tmp / "concepts.json").write_text(
            json.dumps({"concepts": CONCEPTS, "words": vocabulary, "seed": seed, "n": n}, indent=1)
        )
        fsync_dir(tmp)
        replace_dir(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_scene_records(directory: str | Path) -> list[dict]:
    """The per-image ground truth of a scenes folder (scenes.jsonl), in image order."""
    path = Path(directory) / "scenes.jsonl"
    if not path.is_file():
        raise ScenesError(f"{path}: not found (is {directory} a `sparc scenes` folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def instance_mask(directory: str | Path, scene_id: str, obj: int) -> np.ndarray:
    """[size, size] bool: the visible pixels of object ``obj`` of a scene."""
    with Image.open(Path(directory) / "masks" / f"{scene_id}.png") as im:
        return np.asarray(im) == obj + 1
