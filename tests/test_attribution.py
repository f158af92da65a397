"""Heatmaps and caption attribution where the right answer is known, through the real weight loaders.

Tiny ViTs in the DINOv2 and CLIP layouts, with position embeddings set to zero so patches (and caption
tokens) differ only by content: an image that is flat grey except one textured patch, and a caption of
filler words except one, can then only drive a latent through that patch or word.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sparc_core import SparcConfig, SparcModel, save_checkpoint
from sparc_core.attribution import (
    HEATMAP_PNG_SIZE,
    AttributionError,
    attribute_text,
    latent_target,
    localize,
    save_heatmap_png,
    save_words_png,
    text_target,
)
from sparc_core.cli import main
from sparc_core.config import ClipConfig, DinoConfig, EncodersConfig
from sparc_core.encoders import load_encoders
from tests import tiny_models as tm

CLIP_64 = {**tm.CLIP_CFG, "vision_cfg": {**tm.CLIP_CFG["vision_cfg"], "image_size": 64, "layers": 2}}
DINO_SIZE = 56  # a 4 x 4 patch grid at patch 14
# (stream, image side, crop offset, patch side): DINO resizes 64 -> 64 and centre-crops 56; CLIP keeps 64
LAYOUTS = {"dino": (64, 4, 14), "clip_img": (64, 0, 16)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("attr")
    clip = tm.write_clip_dir(d / "clip", cfg=CLIP_64, positions=False)
    dino = tm.write_dino_official(d / "dinov2_vits14_reg4_pretrain.pth", positions=False)
    enc_cfg = EncodersConfig(
        clip=ClipConfig(weights=str(clip)),
        dino=DinoConfig(model=tm.DINO_ARCH, weights=str(dino), model_args=tm.DINO_ARGS, image_size=DINO_SIZE),
        device="cpu",
    )
    encoders = load_encoders(enc_cfg)
    model = SparcModel(SparcConfig(streams={s: e.dim for s, e in encoders.items()}, n_latents=256, k=16, auxk=16), seed=0)
    ckpt = save_checkpoint(model, d / "ckpt")
    flags = ["--clip-weights", str(clip), "--dino-model", tm.DINO_ARCH, "--dino-weights", str(dino)]
    flags += ["--dino-model-args", json.dumps(tm.DINO_ARGS), "--dino-image-size", str(DINO_SIZE)]
    return {"dir": d, "encoders": encoders, "model": model, "ckpt": ckpt, "flags": flags}


def _square(stream: str, cell: int) -> Image.Image:
    side, off, p = LAYOUTS[stream]
    a = np.full((side, side, 3), 120, np.uint8)
    r, c = divmod(cell, 4)
    a[off + r * p : off + (r + 1) * p, off + c * p : off + (c + 1) * p] = (
        np.random.default_rng(cell).random((p, p, 3)) * 255
    ).astype(np.uint8)
    return Image.fromarray(a)


def _driven_latent(model, encoder, image: Image.Image, blank: Image.Image) -> int:
    """The latent the textured patch raises most (over the flat image)."""
    with torch.no_grad():
        a = torch.relu(model.logits(encoder.stream, encoder.encode_images([image])))
        b = torch.relu(model.logits(encoder.stream, encoder.encode_images([blank])))
    return int((a - b)[0].argmax())


@pytest.mark.parametrize("stream", ["dino", "clip_img"])
def test_the_heatmap_peaks_on_the_only_region_that_drives_the_latent(world, stream):
    model, enc = world["model"], world["encoders"][stream]
    side = LAYOUTS[stream][0]
    blank = Image.fromarray(np.full((side, side, 3), 120, np.uint8))
    hits = {"relevance": 0, "gradcam": 0}
    for cell in range(16):
        image = _square(stream, cell)
        target = latent_target(model, [_driven_latent(model, enc, image, blank)])
        for method in hits:
            hm = localize(model, enc, image, target, method=method)
            assert hm.grid.shape == (4, 4)
            hits[method] += int(hm.grid.argmax()) == cell
    assert hits["relevance"] == 16, hits  # attention relevance finds the patch at every one of 16 positions
    # gradient x token can credit a patch that attended to the textured one (chance: 1 of 16)
    assert hits["gradcam"] >= (16 if stream == "clip_img" else 10), hits


def test_heatmap_shape_upsampling_normalisation_and_png(world, tmp_path):
    model, enc = world["model"], world["encoders"]["dino"]
    image, blank = _square("dino", 5), Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    driven = _driven_latent(model, enc, image, blank)
    hm = localize(model, enc, image, latent_target(model, [driven, 9], [2.0, 1.0]), method="relevance")
    assert hm.grid.shape == (4, 4) and hm.upsampled.shape == (DINO_SIZE, DINO_SIZE)  # the encoder's crop
    assert hm.image.shape == (DINO_SIZE, DINO_SIZE, 3) and hm.image.dtype == np.uint8
    for m in (hm.grid, hm.upsampled):
        assert float(m.max()) == pytest.approx(1.0) and float(m.min()) == pytest.approx(0.0, abs=1e-6)
    # the upsampled map keeps the grid's peak cell
    r, c = divmod(int(hm.grid.argmax()), 4)
    up = hm.upsampled
    assert int(up.reshape(4, 14, 4, 14).mean((1, 3)).argmax()) == r * 4 + c
    out = save_heatmap_png(hm, tmp_path / "h.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == HEATMAP_PNG_SIZE
    js = hm.to_json()
    assert js["shape"] == [4, 4] and len(js["grid"]) == 16 and [x["latent"] for x in js["latents"]] == [driven, 9]
    assert js["latents"][0]["weight"] == 2.0


def test_caption_attribution_ranks_the_driving_word_first(world):
    model, enc = world["model"], world["encoders"]["clip_txt"]
    for i, word in enumerate(["zebra", "bus", "balloons", "guitar", "mountain", "violin"]):
        words = ["the"] * 6
        base = " ".join(words)
        words[i % 5] = word
        caption = " ".join(words)
        with torch.no_grad():
            a = torch.relu(model.logits("clip_txt", enc.encode_texts([caption])))
            b = torch.relu(model.logits("clip_txt", enc.encode_texts([base])))
        target = latent_target(model, [int((a - b)[0].argmax())])
        ws = attribute_text(model, enc, caption, target, method="grad")
        assert ws.words == words
        assert int(np.argmax(ws.scores)) == i % 5, list(zip(ws.words, ws.scores))
        assert max(abs(s) for s in ws.scores) == pytest.approx(1.0)


def test_bpe_pieces_merge_back_into_words_and_both_methods_run(world, tmp_path):
    model, enc = world["model"], world["encoders"]["clip_txt"]
    caption = "an unbelievably photogenic hippopotamus"
    assert len(enc.clip.tokenizer([caption])[0].nonzero()) > 6  # the rare words are split into several tokens
    for method in ("grad", "relevance"):
        ws = attribute_text(model, enc, caption, method=method)
        assert ws.words == caption.split()
        assert ws.target.source == caption and ws.target.latents  # default target: the caption's own code
    out = save_words_png(ws, tmp_path / "w.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[1] < im.size[0]


def test_clip_similarity_baseline_and_errors(world):
    model, enc = world["model"], world["encoders"]
    target = text_target(model, enc["clip_txt"], "a red bus")
    assert abs(sum(target.weights) - 1) < 1e-5 and target.source == "a red bus"
    hm = localize(model, enc["clip_img"], _square("clip_img", 2), target, method="clip-sim", text_encoder=enc["clip_txt"])
    assert hm.grid.shape == (4, 4) and float(hm.grid.max()) == pytest.approx(1.0)
    with pytest.raises(AttributionError, match="needs the CLIP image tower"):
        localize(model, enc["dino"], _square("dino", 2), target, method="clip-sim", text_encoder=enc["clip_txt"])
    with pytest.raises(AttributionError, match="needs a caption"):
        localize(model, enc["clip_img"], _square("clip_img", 2), latent_target(model, [1]), method="clip-sim")
    with pytest.raises(AttributionError, match="latent 999 is out of range"):
        latent_target(model, [999])
    with pytest.raises(AttributionError, match="is not an image encoder"):
        localize(model, enc["clip_txt"], _square("clip_img", 2), target)
    with pytest.raises(AttributionError, match="unknown method"):
        localize(model, enc["dino"], _square("dino", 2), target, method="magic")


def test_cli_localize_and_attribute(world, tmp_path, capsys):
    img = tmp_path / "q.png"
    _square("dino", 6).save(img)
    base = ["--checkpoint", str(world["ckpt"]), *world["flags"]]
    argv = ["localize", *base, "--image", str(img), "--text", "a red bus", "--out", str(tmp_path / "h.png")]
    assert main([*argv, "--json", str(tmp_path / "h.json")]) == 0
    assert "heatmap 4x4 (relevance on dino)" in capsys.readouterr().out
    js = json.loads((tmp_path / "h.json").read_text())
    assert js["target_source"] == "a red bus" and len(js["grid"]) == 16
    assert main(["localize", *base, "--image", str(img), "--latent", "4", "--latent", "7", "--stream", "clip_img",
                 "--method", "gradcam", "--out", str(tmp_path / "h2.png")]) == 0  # fmt: skip
    with Image.open(tmp_path / "h2.png") as im:
        assert im.size == HEATMAP_PNG_SIZE
    argv = [
        "attribute",
        *base,
        "--text",
        "a dog on a beach",
        "--out",
        str(tmp_path / "w.png"),
        "--json",
        str(tmp_path / "w.json"),
    ]
    assert main(argv) == 0
    assert [w["word"] for w in json.loads((tmp_path / "w.json").read_text())["words"]] == ["a", "dog", "on", "a", "beach"]
    capsys.readouterr()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    for extra, message in (
        (["--image", str(bad), "--text", "x"], "not a readable image"),
        (["--image", str(img), "--latent", "5000"], "latent 5000 is out of range"),
        (["--image", str(img), "--text", "x", "--method", "clip-sim"], "needs the CLIP image tower"),
    ):
        assert main(["localize", *base, *extra, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_report_shows_heatmaps_of_a_latent_on_its_top_images(world, tmp_path):
    """`sparc report --heatmaps 1` with the image encoders: each shown latent's card holds its heatmap."""
    import csv

    from index import build_bundle

    enc = world["encoders"]["dino"]
    (tmp_path / "images").mkdir()
    images = [_square("dino", cell) for cell in range(6)]
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption", "id"])
        for i, im in enumerate(images):
            im.save(tmp_path / "images" / f"{i}.png")
            w.writerow([f"{i}.png", f"square at cell {i}", f"sq-{i}"])
    np.save(tmp_path / "dino.npy", enc.encode_images(images).numpy())
    (tmp_path / "ids.txt").write_text("\n".join(f"sq-{i}" for i in range(6)) + "\n")
    build_bundle(world["ckpt"], "dino", tmp_path / "dino.npy", tmp_path / "b", ids=tmp_path / "ids.txt", progress=False)
    argv = ["report", "--checkpoint", str(world["ckpt"]), "--index", f"squares={tmp_path / 'b'}", "--max-latents", "5"]
    argv += ["--captions", str(tmp_path / "captions.csv"), "--images", str(tmp_path / "images"), "--heatmaps", "1"]
    assert main([*argv, *world["flags"], "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    heat = re.findall(r"<img class='heatmap' src='(thumbs/heat-\d+-[^']+)'", page)
    assert len(heat) == 5  # one per shown latent (each fires on some square)
    for src in heat:
        with Image.open(tmp_path / "r" / src) as im:
            assert im.size == HEATMAP_PNG_SIZE
