"""Rendered scenes: image-caption pairs whose concepts and object masks are known, to measure the product on pixels.

Each image holds 1-4 objects, each a shape x colour x texture of its family's vocabulary (``FAMILIES``: "shapes"
below, and "glyphs", with other shapes, colours, textures, background and caption grammar), at a random
position, size and rotation over a cluttered background; later objects partly occlude earlier ones (every object keeps
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
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..atomic import fsync_dir, replace_dir
from ..config import SparcError

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
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class SceneFamily:
    """One kind of rendered scenes: its vocabulary (shapes, colours, textures and their words), its look
    (the background) and its caption grammar. Two families share no shape, colour or texture, so a
    default chosen on one can be checked on the other."""

    name: str
    shape_words: dict[str, tuple[str, ...]]
    colours: dict[str, tuple[int, int, int]]
    colour_words: dict[str, tuple[str, ...]]
    texture_words: dict[str, tuple[str, ...]]  # the first texture is the plain one
    fillers: tuple[str, ...]
    tails: tuple[str, ...]
    relations: dict[str, str]
    grammar: str  # "prenominal": "a striped red square"; "postnominal": "a kite in teal, checkered"
    background: str  # "clutter": gradient + grey lines and blobs; "tiles": a pale mosaic with speckle

    @property
    def shapes(self) -> tuple[str, ...]:
        return tuple(self.shape_words)

    @property
    def textures(self) -> tuple[str, ...]:
        return tuple(self.texture_words)

    @property
    def concepts(self) -> list[str]:
        """The columns of labels.npy."""
        return [*self.shapes, *self.colours, *self.textures]

    def phrase(self, colour: str, shape: str) -> str:
        """The plain query naming one colour x shape class, in the family's grammar."""
        return f"a {colour} {shape}" if self.grammar == "prenominal" else f"a {shape} in {colour}"

    def object_words(self) -> set[str]:
        """Every word that names a shape, colour or texture."""
        groups = (*self.shape_words.values(), *self.colour_words.values(), *self.texture_words.values())
        return {w for words in groups for p in words for w in p.split()}


SHAPES_FAMILY = SceneFamily(
    name="shapes",
    shape_words=SHAPE_WORDS,
    colours=COLOURS,
    colour_words=COLOUR_WORDS,
    texture_words=TEXTURE_WORDS,
    fillers=FILLERS,
    tails=TAILS,
    relations=RELATIONS,
    grammar="prenominal",
    background="clutter",
)
GLYPHS_FAMILY = SceneFamily(
    name="glyphs",
    shape_words={
        "heart": ("heart",),
        "arrow": ("arrow", "pointer"),
        "crescent": ("crescent", "moon"),
        "octagon": ("octagon",),
        "trapezoid": ("trapezoid",),
        "kite": ("kite",),
        "chevron": ("chevron", "v shape"),
        "semicircle": ("semicircle", "half disc"),
    },
    colours={
        "brown": (130, 80, 40),
        "lime": (140, 230, 30),
        "navy": (20, 30, 120),
        "magenta": (225, 20, 170),
        "teal": (0, 130, 125),
        "maroon": (120, 0, 30),
        "olive": (120, 120, 0),
        "white": (245, 245, 245),
    },
    colour_words={
        "brown": ("brown", "chocolate"),
        "lime": ("lime",),
        "navy": ("navy", "dark blue"),
        "magenta": ("magenta", "fuchsia"),
        "teal": ("teal",),
        "maroon": ("maroon",),
        "olive": ("olive",),
        "white": ("white", "snowy"),
    },
    texture_words={"flat": ("", "flat"), "checkered": ("checkered", "chequered"), "ringed": ("ringed", "banded")},
    fillers=("in this image:", "the scene contains", "i see", "shown here:", "you can spot"),
    tails=("", "", " on tiles", " today", " as well"),
    relations={"left": "on the left of", "right": "on the right of", "above": "over", "below": "under"},
    grammar="postnominal",
    background="tiles",
)
FAMILIES = {f.name: f for f in (SHAPES_FAMILY, GLYPHS_FAMILY)}


def scene_family(name: str) -> SceneFamily:
    """The family called ``name``; a clear error naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ScenesError(f"unknown scene family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


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
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = list(zip(16 * np.sin(t) ** 3 / 17, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17))
    elif shape == "arrow":
        pts = [(-1, -0.3), (0.15, -0.3), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.3), (-1, 0.3)]
    elif shape == "crescent":  # the unit disc less a disc of radius 0.8 shifted right by 0.45
        outer = np.linspace(0.896, 2 * math.pi - 0.896, 30)
        inner = np.linspace(2 * math.pi - 1.35, 1.35, 24)
        pts = [(math.cos(a), math.sin(a)) for a in outer] + [(0.45 + 0.8 * math.cos(a), 0.8 * math.sin(a)) for a in inner]
    elif shape == "trapezoid":
        pts = [(-1, 0.6), (1, 0.6), (0.5, -0.6), (-0.5, -0.6)]
    elif shape == "kite":
        pts = [(0, -1), (0.6, -0.25), (0, 1), (-0.6, -0.25)]
    elif shape == "chevron":
        pts = [(-1, -0.7), (0, 0.1), (1, -0.7), (1, 0), (0, 0.8), (-1, 0)]
    elif shape == "semicircle":
        pts = [(math.cos(a), math.sin(a) + 0.4) for a in np.linspace(math.pi, 2 * math.pi, 32)]
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6, "pentagon": 5, "octagon": 8}[shape]
        start = math.pi / 4 if shape == "square" else -math.pi / 2
        pts = [(math.cos(start + 2 * math.pi * j / sides), math.sin(start + 2 * math.pi * j / sides)) for j in range(sides)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(rng: np.random.Generator, size: int, style: str = "clutter") -> np.ndarray:
    """A low-contrast gradient with grey clutter (lines and blobs that are no shape of the vocabulary), or
    ("tiles") a pale mosaic of greyish tiles with speckle."""
    if style == "tiles":
        n = int(rng.integers(3, 7))
        tiles = rng.uniform(150, 215, size=(n, n, 1)) + rng.uniform(-12, 12, size=(n, n, 3))
        img = np.kron(tiles, np.ones((size // n + 1, size // n + 1, 1)))[:size, :size]
        edges = (np.arange(size) % (size // n + 1)) == 0
        img[edges, :] *= 0.8
        img[:, edges] *= 0.8
        return (img + rng.normal(0, 9, (size, size, 3))).clip(0, 255).astype(np.uint8)
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
    if texture not in ("solid", "flat"):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        dark = np.asarray(colour, dtype=np.float32) * 0.45 + (90 if min(colour) > 200 else 0)  # white: a grey shade
        if texture == "checkered":
            cell = rng.uniform(4.0, 6.5)
            on = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) == 1
        elif texture == "ringed":
            ys, xs = np.nonzero(mask)
            r = np.hypot(xx - xs.mean(), yy - ys.mean())
            on = np.sin(r * 2 * math.pi / rng.uniform(5.0, 7.0)) > 0.2
        elif texture == "striped":
            theta = rng.uniform(0, math.pi)
            period = rng.uniform(4.0, 7.0)
            on = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period) > 0.2
        else:
            step = rng.uniform(5.0, 8.0)
            ox, oy = rng.uniform(0, step, 2)
            on = (((xx - ox) % step - step / 2) ** 2 + ((yy - oy) % step - step / 2) ** 2) < (step / 4.5) ** 2
        fill[on] = dark
    canvas[mask] = fill[mask].astype(np.uint8)


def _object_phrase(rng: np.random.Generator, o: SceneObject, det: str, family: SceneFamily = SHAPES_FAMILY) -> str:
    shape = str(rng.choice(family.shape_words[o.shape]))
    colour = str(rng.choice(family.colour_words[o.colour]))
    texture = str(rng.choice(family.texture_words[o.texture]))
    plain = o.texture == family.textures[0]
    if family.grammar == "postnominal":  # "a kite in teal", "a checkered kite coloured teal", "a teal kite, ringed"
        form = rng.random()
        if form < 0.4:
            words = (det, texture, shape, "in", colour)
        elif form < 0.7:
            words = (det, shape, "coloured", colour) + ((", " + texture,) if texture and not plain else ())
        else:
            words = (det, colour, shape) + ((", " + texture,) if texture and not plain else ())
        return _article(" ".join(w for w in words if w).replace(" ,", ","))
    if not plain and rng.random() < 0.3:  # "a red square with stripes"
        return _article(f"{det} {colour} {shape} with {'stripes' if o.texture == 'striped' else 'dots'}")
    return _article(" ".join(w for w in (det, texture, colour, shape) if w))


def _article(phrase: str) -> str:
    """'a orange ...' -> 'an orange ...'."""
    head, _, rest = phrase.partition(" ")
    return f"an {rest}" if head == "a" and rest[:1] in "aeiou" else phrase


def _relation(a: SceneObject, b: SceneObject, family: SceneFamily = SHAPES_FAMILY) -> str:
    """Where ``a`` is relative to ``b``, from the visible centroids, in the family's words."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return family.relations["left" if dx < 0 else "right"]
    return family.relations["above" if dy < 0 else "below"]


def caption_for(
    rng: np.random.Generator, objects: list[SceneObject], family: SceneFamily = SHAPES_FAMILY
) -> tuple[str, list[int], dict | None]:
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
        first, second = _object_phrase(rng, objects[a], "a", family), _object_phrase(rng, objects[b], "the", family)
        relation = {"subject": int(a), "relation": _relation(objects[a], objects[b], family), "object": int(b)}
        body = f"{first} {relation['relation']} {second}"
    else:
        phrases = [_object_phrase(rng, objects[i], str(rng.choice(("a", "one"))), family) for i in order]
        joint = " and " if family.grammar == "prenominal" else "; plus "
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + joint + phrases[-1]
    start = str(rng.choice(family.fillers)) + " " if rng.random() < 0.6 else ""
    return f"{start}{body}{rng.choice(family.tails)}".strip(), sorted(named), relation


def render_scene(
    seed: int, index: int, size: int = 112, family: SceneFamily = SHAPES_FAMILY
) -> tuple[Image.Image, np.ndarray, list[SceneObject], str, list[int], dict | None]:
    """Scene ``index`` of the set drawn with ``seed``: (image, [size, size] uint8 instance map, objects,
    caption, indices of the objects the caption names, the relation it states or None)."""
    rng = np.random.default_rng([seed, index])
    canvas = _background(rng, size, family.background)
    owner = np.zeros((size, size), dtype=np.uint8)
    own_area: list[int] = []
    specs = []
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    for k in range(n):
        for _ in range(20):  # find a place that leaves every earlier object enough of its pixels
            r = float(rng.uniform(size * 0.09, size * 0.2))
            cx, cy = (float(v) for v in rng.uniform(r * 0.8, size - r * 0.8, 2))
            shape = str(rng.choice(family.shapes))
            pil = Image.new("L", (size, size), 0)
            ImageDraw.Draw(pil).polygon(_polygon(shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), fill=1)
            mask = np.asarray(pil, dtype=bool)
            after = owner.copy()
            after[mask] = k + 1
            if mask.sum() > 0 and all((after == j + 1).sum() >= MIN_VISIBLE * own_area[j] for j in range(k)):
                break
        else:
            break  # no room left: fewer objects
        colour, texture = str(rng.choice(list(family.colours))), str(rng.choice(family.textures))
        _paint(canvas, mask, family.colours[colour], texture, rng)
        owner = after
        own_area.append(int(mask.sum()))
        specs.append((shape, colour, texture))
    objects = []
    for j, (shape, colour, texture) in enumerate(specs):
        ys, xs = np.nonzero(owner == j + 1)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(shape, colour, texture, bbox, (float(xs.mean()), float(ys.mean())), len(xs) / own_area[j]))
    caption, named, relation = caption_for(rng, objects, family)
    return Image.fromarray(canvas), owner, objects, caption, named, relation


def concept_labels(objects: list[SceneObject], family: SceneFamily = SHAPES_FAMILY) -> np.ndarray:
    """[len(family.concepts)] uint8: which shapes, colours and textures the scene holds."""
    concepts = family.concepts
    out = np.zeros(len(concepts), dtype=np.uint8)
    for o in objects:
        for name in (o.shape, o.colour, o.texture):
            out[concepts.index(name)] = 1
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _render_range(tmp: Path, seed: int, size: int, family: str, width: int, start: int, stop: int) -> list[tuple]:
    """Render scenes ``start..stop-1`` into ``tmp``'s images/ and masks/; their rows for the metadata files."""
    fam = scene_family(family)
    rows = []
    for i in range(start, stop):
        image, owner, objects, caption, named, relation = render_scene(seed, i, size, fam)
        name = f"{i:0{width}d}"
        (tmp / "images" / f"{name}.png").write_bytes(_png(image))
        (tmp / "masks" / f"{name}.png").write_bytes(_png(Image.fromarray(owner)))
        record = {"id": name, "caption": caption, "named": named, "relation": relation}
        record["objects"] = [asdict(o) for o in objects]
        rows.append((name, caption, record, concept_labels(objects, fam)))
    return rows


def _rendered(tmp: Path, n: int, seed: int, size: int, family: str, width: int, workers: int, progress: bool):
    """Each scene's metadata row in scene order, rendered by ``workers`` processes (every scene is a function
    of (seed, index) alone, so the files do not depend on how many render them)."""
    chunk = 256
    ranges = [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    bar = tqdm(total=n, desc="rendering scenes", unit="scene", disable=not progress)
    pool = None
    if min(workers, len(ranges)) <= 1:  # one chunk, or one worker: rendered here, no process to start
        chunks = (_render_range(tmp, seed, size, family, width, a, b) for a, b in ranges)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(min(workers, len(ranges)), mp_context=multiprocessing.get_context("spawn"))
        futures = [pool.submit(_render_range, tmp, seed, size, family, width, a, b) for a, b in ranges]
        chunks = (f.result() for f in futures)  # in scene order; the pool renders ahead
    try:
        for rows in chunks:
            bar.update(len(rows))
            yield from rows
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # nothing still writes once the caller cleans up
        bar.close()


def write_scenes(
    out: str | Path, n: int, seed: int = 0, size: int = 112, overwrite: bool = False, progress: bool = True,
    family: str = "shapes", workers: int = 1,
) -> Path:  # fmt: skip
    """Render ``n`` scenes of a family into ``out`` (see the module doc) with ``workers`` processes (0: one per
    CPU); returns ``out``. The files are the same whatever the number of workers."""
    out = Path(out)
    fam = scene_family(family)
    if n < 1:
        raise ScenesError(f"--n must be >= 1, got {n}")
    if workers < 0:
        raise ScenesError(f"--workers must be >= 0, got {workers}")
    workers = workers or os.cpu_count() or 1
    if not 32 <= size <= 1024:
        raise ScenesError(f"--size must be in [32, 1024], got {size}")
    if out.exists() and not overwrite:
        raise ScenesError(f"{out} exists: pick another --out or pass --overwrite")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    labels = np.zeros((n, len(fam.concepts)), dtype=np.uint8)
    width = max(6, len(str(n - 1)))
    try:
        with open(tmp / "captions.csv", "w", newline="", encoding="utf-8") as cap, open(tmp / "scenes.jsonl", "w") as meta:
            writer = csv.writer(cap)
            writer.writerow(["image_path", "caption", "id"])
            # closed before anything is cleaned up: a failure or Ctrl-C stops the pool, then removes the partial folder
            with closing(_rendered(tmp, n, seed, size, fam.name, width, workers, progress)) as rendered:
                for i, (name, caption, record, row_labels) in enumerate(rendered):
                    writer.writerow([f"{name}.png", caption, name])
                    meta.write(json.dumps(record) + "\n")
                    labels[i] = row_labels
        np.save(tmp / "labels.npy", labels, allow_pickle=False)
        vocabulary = {"shapes": fam.shape_words, "colours": fam.colour_words, "textures": fam.texture_words}
        (tmp / "concepts.json").write_text(
            json.dumps({"family": fam.name, "concepts": fam.concepts, "words": vocabulary, "seed": seed, "n": n}, indent=1)
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


def family_of(directory: str | Path) -> SceneFamily:
    """The family a scenes folder was rendered from (its concepts.json; folders from before families: shapes)."""
    path = Path(directory) / "concepts.json"
    if not path.is_file():
        raise ScenesError(f"{path}: not found (is {directory} a `sparc scenes` folder?)")
    return scene_family(json.loads(path.read_text()).get("family", "shapes"))


def instance_mask(directory: str | Path, scene_id: str, obj: int) -> np.ndarray:
    """[size, size] bool: the visible pixels of object ``obj`` of a scene."""
    with Image.open(Path(directory) / "masks" / f"{scene_id}.png") as im:
        return np.asarray(im) == obj + 1
