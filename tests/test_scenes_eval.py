"""The localisation instruments are fair: every row on the same pairs, baselines independent of the SAE,
no map is no detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparc_core import SparcConfig, SparcModel
from sparc_core.config import ClipConfig, DinoConfig, EncodersConfig
from sparc_core.encoders import load_encoders
from sparc_core.encoders import tiny as tm
from sparc_core.explain.attribution import AttributionError, Heatmap, Target
from sparc_core.worlds import scenes_eval as se
from sparc_core.worlds.scenes import family_of, read_scene_records, write_scenes

CLIP_64 = {**tm.CLIP_CFG, "vision_cfg": {**tm.CLIP_CFG["vision_cfg"], "image_size": 64, "layers": 2}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("loc")
    scenes = write_scenes(d / "scenes", 40, seed=2, size=64, progress=False)
    clip = tm.write_clip_dir(d / "clip", cfg=CLIP_64)
    dino = tm.write_dino_official(d / "dinov2_vits14_reg4_pretrain.pth")
    # DINO resizes 64 -> 64 * 256 / 224 and centre-crops 42: objects near the border leave its crop, not CLIP's
    encoders = load_encoders(
        EncodersConfig(
            clip=ClipConfig(weights=str(clip)),
            dino=DinoConfig(model=tm.DINO_ARCH, weights=str(dino), model_args=tm.DINO_ARGS, image_size=42),
            device="cpu",
        )
    )
    # scene 0's first object is moved into the left border column: CLIP's crop keeps it, DINO's drops it
    mask_png = scenes / "masks" / "000000.png"
    owner = np.array(Image.open(mask_png))
    owner[owner == 1] = 0
    owner[10:30, 0] = 1
    Image.fromarray(owner).save(mask_png)
    model = SparcModel(SparcConfig(streams={s: e.dim for s, e in encoders.items()}, n_latents=128, k=16, auxk=16), seed=0)
    records = read_scene_records(scenes)
    images = {s: encoders[s] for s in ("dino", "clip_img")}
    return {"scenes": scenes, "records": records, "encoders": encoders, "images": images, "model": model}


def test_every_row_is_scored_on_the_same_pairs(world):
    scenes, records, images = world["scenes"], world["records"], world["images"]
    pairs = se.localisation_pairs(scenes, records, images, max_pairs=1000)
    assert pairs and all(set(p.masks) == {"dino", "clip_img"} for p in pairs)
    assert all(m.any() for p in pairs for m in p.masks.values())  # visible in every encoder's crop
    # a class visible to CLIP alone (outside DINO's crop) is in no pair: alone, each encoder would count it
    alone = {s: se.localisation_pairs(scenes, records, {s: e}, max_pairs=1000) for s, e in images.items()}
    keys = lambda ps: {(p.scene, p.cls) for p in ps}  # noqa: E731
    assert keys(pairs) == keys(alone["dino"]) & keys(alone["clip_img"])
    assert len(keys(alone["clip_img"]) - keys(pairs)) >= 1
    fam = family_of(scenes)
    assert all(p.query == fam.phrase(*p.cls.split(" ", 1)) for p in pairs)


def test_a_baseline_does_not_change_when_the_sae_target_fails(world, monkeypatch):
    scenes, model, enc = world["scenes"], world["model"], world["encoders"]
    pairs = se.localisation_pairs(scenes, world["records"], world["images"], max_pairs=12)
    clip = se.clip_heatmaps(model, enc["clip_img"], enc["clip_txt"])
    sparc = se.sparc_heatmaps(model, enc["dino"], enc["clip_txt"])
    before = se.localisation_table(scenes, pairs, "clip_img", clip)
    assert before["detected"] == 1.0 and before["pairs"] == len(pairs)

    def no_latent(*a, **k):
        raise AttributionError("the phrase activates no latent")

    monkeypatch.setattr(se, "text_target", no_latent)  # the SAE finds no latent for any phrase
    assert se.localisation_table(scenes, pairs, "clip_img", clip) == before
    broken = se.localisation_table(scenes, pairs, "dino", sparc)
    assert broken == {"pointing": 0.0, "iou": 0.0, "iou>=0.2": 0.0, "detected": 0.0, "mask_AP@0.2": 0.0, "pairs": len(pairs)}


def _heatmap(upsampled: np.ndarray, fires: bool = True) -> Heatmap:
    return Heatmap(
        grid=upsampled, upsampled=upsampled, method="relevance", stream="dino", target=Target([0], [1.0]),
        image=np.zeros((*upsampled.shape, 3), np.uint8), target_fires=fires,
    )  # fmt: skip


def test_no_map_a_flat_map_or_a_silent_target_detects_nothing(world):
    scenes, model, enc = world["scenes"], world["model"], world["encoders"]
    pairs = se.localisation_pairs(scenes, world["records"], world["images"], max_pairs=12)
    # a flat map covering the object at pixel (0, 0) must not win the pointing game by argmax's tie rule
    for p in pairs:
        p.masks["dino"][0, 0] = True
    shape = pairs[0].masks["dino"].shape
    masks = {(p.scene, p.query): p.masks["dino"] for p in pairs}
    oracle = lambda image, q: _heatmap(masks[next(k for k in masks if k[1] == q)].astype(np.float32))  # noqa: E731
    flat = lambda image, q: _heatmap(np.zeros(shape, np.float32))  # noqa: E731
    nothing = lambda image, q: None  # noqa: E731
    for none in (flat, nothing):
        row = se.localisation_table(scenes, pairs, "dino", none)
        assert row["pointing"] == row["iou"] == row["detected"] == row["mask_AP@0.2"] == 0.0, row
    one = se.localisation_table(scenes, pairs[:1], "dino", oracle)
    assert one["pointing"] == one["iou"] == one["detected"] == one["mask_AP@0.2"] == 1.0
    # SPARC's maps: a target that fires nowhere on the image gives no map
    heat = se.sparc_heatmaps(model, enc["dino"], enc["clip_txt"])
    with torch.no_grad():
        model.codecs["dino"].b_enc.fill_(-1e6)  # no latent can fire in DINO
    try:
        assert heat(Image.open(scenes / "images" / f"{pairs[0].scene}.png").convert("RGB"), pairs[0].query) is None
    finally:
        with torch.no_grad():
            model.codecs["dino"].b_enc.zero_()


def test_one_attribute_floor_ranks_by_that_attribute_alone_with_ties_in_random_order():
    from sparc_core.worlds.scenes import scene_family

    obj = lambda colour, shape: {"colour": colour, "shape": shape}  # noqa: E731
    records = [
        {"objects": [obj("red", "circle")]},
        {"objects": [obj("red", "square")]},
        {"objects": [obj("blue", "circle")]},
        {"objects": [obj("red", "circle"), obj("red", "square")]},
    ]
    fam = scene_family("shapes")
    # colour: each query's top scene (most objects of its colour) holds it -> P@1 1.0
    assert se.one_attribute_floor(records, fam, "colour", k=1)["P@1"] == 1.0
    # shape: "red circle" ties 3 circle scenes (2 relevant), "blue circle" the same 3 (1 relevant), "red
    # square" ties 2 (both relevant): (2/3 + 1/3 + 1) / 3 in expectation over random orders
    floor = se.one_attribute_floor(records, fam, "shape", k=1, orders=3000)
    assert floor["P@1"] == pytest.approx(2 / 3, abs=0.02) and floor["queries"] == 3
    with pytest.raises(ValueError, match="'colour' or 'shape'"):
        se.one_attribute_floor(records, fam, "texture")


def test_the_readout_oracle_reaches_the_ceiling_only_on_features_that_hold_the_pairs():
    from sparc_core.worlds.scenes import scene_family

    fam = scene_family("shapes")
    colours, shapes = list(fam.colours)[:4], list(fam.shapes)[:4]
    g = np.random.default_rng(0)
    records = [
        {"objects": [{"colour": str(g.choice(colours)), "shape": str(g.choice(shapes))} for _ in range(g.integers(1, 4))]}
        for _ in range(1500)
    ]

    def features(recs: list[dict], kind: str) -> np.ndarray:
        x = np.zeros((len(recs), 16), np.float32)
        for i, r in enumerate(recs):
            for o in r["objects"]:
                c, s = colours.index(o["colour"]), shapes.index(o["shape"])
                if kind == "pairs":
                    x[i, 4 * c + s] += 1
                else:  # the colour alone: no linear read-out can tell which shape has it
                    x[i, c] += 1
        return x + 0.05 * g.standard_normal(x.shape).astype(np.float32)

    train, test = records[:1000], records[1000:]
    queries = se.concept_queries(test, fam)
    ceiling = se.retrieval_ceiling(queries)["P@10"]
    result = {}
    for kind in ("pairs", "colour"):
        scores = se.readout_scores(features(train, kind), train, features(test, kind), test)
        result[kind] = se.retrieval_table(lambda texts, s=scores: s, queries)
    assert result["pairs"]["mAP"] > 0.97 and result["pairs"]["P@10"] == pytest.approx(ceiling, abs=0.01)
    colour_floor = se.one_attribute_floor(test, fam, "colour")["mAP"]
    assert result["colour"]["mAP"] < colour_floor + 0.1 < result["pairs"]["mAP"]
    # labels that do not belong to the rows teach nothing
    shuffled = [train[i] for i in g.permutation(len(train))]
    scores = se.readout_scores(features(train, "pairs"), shuffled, features(test, "pairs"), test)
    assert se.retrieval_table(lambda texts: scores, queries)["mAP"] < 0.5
    with pytest.raises(ValueError, match="training records"):
        se.readout_scores(features(train, "pairs"), train[:10], features(test, "pairs"), test)
