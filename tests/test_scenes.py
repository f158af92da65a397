"""Rendered scenes: deterministic, masks and labels that match the objects, captions that name what is there."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from sparc_core.cli import main
from sparc_core.extract import read_captions
from sparc_core.worlds.scenes import (
    COLOUR_WORDS,
    COLOURS,
    CONCEPTS,
    MIN_VISIBLE,
    SHAPE_WORDS,
    SHAPES,
    TEXTURES,
    ScenesError,
    instance_mask,
    read_scene_records,
    render_scene,
    write_scenes,
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "set"
    assert main(["scenes", "--out", str(out), "--n", "120", "--seed", "3", "--quiet"]) == 0
    return out


def test_the_vocabulary_is_large_enough():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(TEXTURES) >= 3
    assert len(CONCEPTS) == len(set(CONCEPTS)) == len(SHAPES) + len(COLOURS) + len(TEXTURES)


def test_scenes_are_deterministic_by_seed(tmp_path):
    a = write_scenes(tmp_path / "a", 12, seed=7, progress=False)
    b = write_scenes(tmp_path / "b", 12, seed=7, progress=False)
    c = write_scenes(tmp_path / "c", 12, seed=8, progress=False)
    assert (a / "captions.csv").read_text() == (b / "captions.csv").read_text()
    for i in range(12):
        assert (a / "images" / f"{i:06d}.png").read_bytes() == (b / "images" / f"{i:06d}.png").read_bytes()
    assert (a / "captions.csv").read_text() != (c / "captions.csv").read_text()


def test_scenes_rendered_by_several_processes_are_the_same_files(tmp_path):
    one = write_scenes(tmp_path / "one", 600, seed=5, size=48, progress=False, workers=1)
    two = write_scenes(tmp_path / "two", 600, seed=5, size=48, progress=False, workers=2)  # 3 chunks over 2 processes
    for name in ("captions.csv", "scenes.jsonl", "labels.npy", "concepts.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    for sub in ("images", "masks"):
        files = sorted(p.name for p in (one / sub).iterdir())
        assert files == sorted(p.name for p in (two / sub).iterdir()) and len(files) == 600
        assert all((one / sub / f).read_bytes() == (two / sub / f).read_bytes() for f in files)
    with pytest.raises(ScenesError, match="--workers must be >= 0"):
        write_scenes(tmp_path / "bad", 5, progress=False, workers=-1)


def test_masks_labels_and_boxes_match_the_objects(scenes):
    records = read_scene_records(scenes)
    labels = np.load(scenes / "labels.npy")
    assert len(records) == len(labels) == 120
    counts = [len(r["objects"]) for r in records]
    assert min(counts) == 1 and max(counts) == 4 and len(set(counts)) == 4  # 1-4 objects, all four counts occur
    occluded = 0
    for r, row in zip(records, labels):
        owner = np.asarray(Image.open(scenes / "masks" / f"{r['id']}.png"))
        assert owner.shape == (112, 112) and int(owner.max()) == len(r["objects"])
        for j, o in enumerate(r["objects"]):
            m = instance_mask(scenes, r["id"], j)
            ys, xs = np.nonzero(m)
            assert len(xs) > 0 and o["visible"] >= MIN_VISIBLE - 1e-9
            assert o["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            assert abs(o["centre"][0] - xs.mean()) < 1e-6 and abs(o["centre"][1] - ys.mean()) < 1e-6
            occluded += o["visible"] < 0.999
        want = {CONCEPTS.index(x) for o in r["objects"] for x in (o["shape"], o["colour"], o["texture"])}
        assert set(np.flatnonzero(row).tolist()) == want
    assert occluded > 10  # partial occlusion is common


def test_captions_name_their_objects_and_relations_hold(scenes):
    records = read_scene_records(scenes)
    partial = relations = 0
    for r in records:
        cap = r["caption"]
        for j in r["named"]:
            o = r["objects"][j]
            assert any(re.search(rf"\b{w}\b", cap) for w in COLOUR_WORDS[o["colour"]]), (cap, o)
            assert any(re.search(rf"\b{w}\b", cap) for w in SHAPE_WORDS[o["shape"]]), (cap, o)
        partial += len(r["named"]) < len(r["objects"])
        rel = r["relation"]
        if rel is not None:
            relations += 1
            a, b = r["objects"][rel["subject"]], r["objects"][rel["object"]]
            assert f" {rel['relation']} " in cap
            dx, dy = a["centre"][0] - b["centre"][0], a["centre"][1] - b["centre"][1]
            expect = (
                ("to the left of" if dx < 0 else "to the right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
            )
            assert rel["relation"] == expect, (cap, a["centre"], b["centre"])
    assert partial > 5 and relations > 5
    assert not any(re.search(r"\ba [aeiou]", r["caption"]) for r in records)  # "an orange", never "a orange"


def test_written_as_extract_reads_it_and_never_half_written(scenes, tmp_path):
    items = read_captions(scenes / "captions.csv")
    assert len(items) == 120 and all((scenes / "images" / it.image).is_file() for it in items)
    assert json.loads((scenes / "concepts.json").read_text())["concepts"] == CONCEPTS
    with pytest.raises(ScenesError, match="exists"):
        write_scenes(scenes, 5, progress=False)
    out = write_scenes(tmp_path / "s", 5, progress=False)
    first = (out / "captions.csv").read_text()
    write_scenes(out, 7, seed=1, overwrite=True, progress=False)
    assert len(read_captions(out / "captions.csv")) == 7 and (out / "captions.csv").read_text() != first
    assert not list(tmp_path.glob(".s.*"))  # no temporary folder left behind
    image, owner, objects, caption, named, _ = render_scene(0, 0, size=64)
    assert image.size == (64, 64) and owner.shape == (64, 64) and caption and named


# ---- the localisation scores (the SPARC authors' COCO protocol) -------------------------------------------
def test_otsu_threshold_maximises_between_class_variance():
    from sparc_core.worlds.scenes_eval import otsu_threshold

    rng = np.random.default_rng(0)
    for _ in range(5):
        v = np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.1, 1000)])
        t = otsu_threshold(v)

        def between(c, v=v):  # brute force over the values themselves
            a, b = v[v < c], v[v >= c]
            return len(a) * len(b) * (a.mean() - b.mean()) ** 2 if len(a) and len(b) else 0.0

        best = max(np.quantile(v, np.linspace(0.01, 0.99, 400)), key=between)
        assert between(t) >= 0.995 * between(best)
        assert 0.3 < t < 0.6  # between the two modes


def test_predicted_mask_cuts_a_blob_and_falls_back_on_a_flat_map():
    from sparc_core.worlds.scenes_eval import localisation_scores, predicted_mask

    heat = np.zeros((40, 40))
    heat[10:20, 10:20] = 1.0
    heat += np.random.default_rng(1).uniform(0, 0.05, heat.shape)
    truth = np.zeros((40, 40), dtype=bool)
    truth[10:20, 10:20] = True
    assert (predicted_mask(heat) == truth).all()
    s = localisation_scores(heat, truth)
    assert s["pointing"] == 1.0 and s["iou"] == 1.0
    assert not predicted_mask(np.ones((8, 8))).any()  # a flat map predicts nothing
    shifted = np.roll(truth, 25, axis=1)
    assert localisation_scores(heat, shifted) == {"pointing": 0.0, "iou": 0.0, "iou>=0.2": 0.0}


def test_mask_ap_matches_coco_interpolation_by_hand():
    from sparc_core.worlds.scenes_eval import mask_ap

    # one class, 4 ground truths, predictions in order: hit, miss, hit, none.
    # precision 1, 1/2, 2/3 at recall 1/4, 1/4, 2/4; made monotone: 1, 2/3, 2/3.
    # 101 recall points: r <= 0.25 -> 1 (26 points), 0.25 < r <= 0.5 -> 2/3 (25 points), beyond -> 0.
    ap = mask_ap(["a"] * 4, [0.9, 0.1, 0.3, None])
    assert ap == pytest.approx((26 * 1 + 25 * 2 / 3) / 101)
    # classes are averaged, not pooled: a perfect class and an empty one give one half
    assert mask_ap(["a", "b"], [0.5, None]) == pytest.approx(0.5)
    assert mask_ap(["a", "a"], [0.5, 0.25]) == pytest.approx(1.0)
    assert mask_ap(["a", "a"], [0.5, 0.25], threshold=0.3) == pytest.approx(51 / 101)


def test_the_retrieval_ceiling_is_what_a_perfect_ranking_scores():
    from sparc_core.worlds.scenes_eval import precision_and_ap, retrieval_ceiling

    g = np.random.default_rng(0)
    queries = [(f"q{i}", g.random(200) < p) for i, p in enumerate((0.01, 0.03, 0.2))]
    ceiling = retrieval_ceiling(queries)
    perfect = [precision_and_ap(rel.astype(float), rel) for _, rel in queries]  # relevant items score 1, others 0
    assert ceiling["P@10"] == pytest.approx(np.mean([p for p, _ in perfect])) and ceiling["P@10"] < 1.0
    assert all(ap == 1.0 for _, ap in perfect) and ceiling["mAP"] == 1.0
