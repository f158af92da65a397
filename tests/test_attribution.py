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
from sparc_core.cli import main
from sparc_core.config import ClipConfig, DinoConfig, EncodersConfig
from sparc_core.encoders import load_encoders
from sparc_core.encoders import tiny as tm
from sparc_core.explain.attribution import (
    HEATMAP_PNG_SIZE,
    AttributionError,
    Target,
    attribute_text,
    latent_target,
    localize,
    save_heatmap_png,
    save_words_png,
    text_target,
)

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
    hits = {"relevance": 0, "gradcam": 0, "grad-x-input": 0}
    for cell in range(16):
        image = _square(stream, cell)
        target = latent_target(model, [_driven_latent(model, enc, image, blank)])
        for method in hits:
            hm = localize(model, enc, image, target, method=method)
            assert hm.grid.shape == (4, 4)
            hits[method] += int(hm.grid.argmax()) == cell
    assert hits["relevance"] == 16, hits  # attention relevance finds the patch at every one of 16 positions
    # gradient x token can credit a patch that attended to the textured one (chance: 1 of 16)
    assert hits["grad-x-input"] >= (16 if stream == "clip_img" else 10), hits
    # Grad-CAM weighs channels by their patch-averaged gradient: coarser, still far above chance
    assert hits["gradcam"] >= 10, hits


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


def _patches(stream: str, textures: dict[int, int]) -> Image.Image:
    """Flat grey with a textured patch at each given cell (cell -> texture seed)."""
    side, off, p = LAYOUTS[stream]
    a = np.full((side, side, 3), 120, np.uint8)
    for cell, seed in textures.items():
        r, c = divmod(cell, 4)
        a[off + r * p : off + (r + 1) * p, off + c * p : off + (c + 1) * p] = (
            np.random.default_rng(100 + seed).random((p, p, 3)) * 255
        ).astype(np.uint8)
    return Image.fromarray(a)


@pytest.mark.parametrize("stream", ["dino", "clip_img"])
def test_two_objects_two_latents_each_map_peaks_on_its_own_object(world, stream):
    # Two different textures in one image; latent A is the one texture 1 raises most over texture 2, latent B
    # the reverse. Each latent's map must peak on its own object (a flat map, or one map for both, fails).
    model, enc = world["model"], world["encoders"][stream]
    for c1, c2 in ((0, 15), (5, 10), (3, 12), (6, 9)):
        with torch.no_grad():
            a = torch.relu(model.logits(stream, enc.encode_images([_patches(stream, {c1: 1})])))[0]
            b = torch.relu(model.logits(stream, enc.encode_images([_patches(stream, {c2: 2})])))[0]
        lat_a, lat_b = int((a - b).argmax()), int((b - a).argmax())
        both = _patches(stream, {c1: 1, c2: 2})
        for lat, cell in ((lat_a, c1), (lat_b, c2)):
            hm = localize(model, enc, both, latent_target(model, [lat]), method="relevance")
            assert hm.target_fires
            assert int(hm.grid.argmax()) == cell, (stream, c1, c2, lat, hm.grid.round(2))
            second = np.sort(hm.grid.ravel())[-2]
            assert float(hm.grid.max() - second) > 0.2, hm.grid.round(2)  # a clear peak, not a flat map


def test_no_tower_or_sae_weight_gets_a_gradient(world):
    model, enc = world["model"], world["encoders"]
    text = "a red bus"
    for method in ("relevance", "gradcam", "grad-x-input", "clip-relevance"):
        localize(
            model, enc["clip_img"], _square("clip_img", 3), text_target(model, enc["clip_txt"], text), method, enc["clip_txt"]
        )
    localize(model, enc["dino"], _square("dino", 3), latent_target(model, [1, 2]), method="gradcam")
    for method in ("grad", "relevance"):
        attribute_text(model, enc["clip_txt"], text, method=method)
    modules = {"sae": model, "dino": enc["dino"].model, "clip": enc["clip_img"].clip.model}
    for name, module in modules.items():
        filled = [n for n, p in module.named_parameters() if p.grad is not None]
        assert not filled, (name, filled[:5])


def test_gradcam_weighs_norm1_channels_by_their_patch_averaged_gradient(world):
    # The reference computed by hand with a hook on the last block's norm1 (the authors' layer).
    model, enc = world["model"], world["encoders"]["dino"]
    image = _patches("dino", {5: 1, 10: 2})
    target = latent_target(model, [3, 7, 11])
    hm = localize(model, enc, image, target, method="gradcam")
    vit, store = enc.model, {}
    h = vit.blocks[-1].norm1.register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        with torch.enable_grad():
            pixels = enc.preprocess(image)[None]
            feats = vit.forward_features(pixels)[:, 0]
            score = (torch.relu(model.logits("dino", feats)) * target.tensor(model.n_latents, model.device)).sum()
            (g,) = torch.autograd.grad(score, [store["a"]])
    finally:
        h.remove()
    prefix = vit.num_prefix_tokens
    act, grad = store["a"][0, prefix:].detach(), g[0, prefix:]
    cam = (act * grad.mean(0, keepdim=True)).sum(-1).clamp_min(0).reshape(4, 4)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    torch.testing.assert_close(torch.from_numpy(hm.grid), cam, atol=1e-4, rtol=1e-4)
    other = localize(model, enc, image, target, method="grad-x-input")
    assert not np.allclose(other.grid, hm.grid, atol=1e-3)  # gradient x input is a different map


def test_a_target_that_does_not_fire_says_so(world, tmp_path, capsys):
    model, enc = world["model"], world["encoders"]["dino"]
    image = _square("dino", 6)
    with torch.no_grad():
        logits = model.logits("dino", enc.encode_images([image]))[0]
    silent = int(logits.argmin())  # ReLU 0 on this image: nothing to follow
    assert float(logits[silent]) < 0
    hm = localize(model, enc, image, latent_target(model, [silent]), method="relevance")
    assert not hm.target_fires and float(hm.grid.max()) == 0.0
    js = hm.to_json()
    assert js["target_fires"] is False and "fires on this image" in js["note"]
    fires = localize(model, enc, image, latent_target(model, [int(logits.argmax())]), method="relevance")
    assert fires.target_fires and fires.note == "" and fires.to_json()["target_fires"] is True
    img = tmp_path / "q.png"
    image.save(img)
    argv = ["localize", "--checkpoint", str(world["ckpt"]), *world["flags"], "--image", str(img), "--latent", str(silent)]
    assert main([*argv, "--out", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "none of the target's latents fires on this image" in out and "peak at" not in out


def test_a_one_word_caption_scores_its_word(world):
    model, enc = world["model"], world["encoders"]["clip_txt"]
    for word in ("zebra", "bus", "guitar"):
        with torch.no_grad():
            a = torch.relu(model.logits("clip_txt", enc.encode_texts([word])))[0]
        target = latent_target(model, [int(a.argmax())])
        ws = attribute_text(model, enc, word, target, method="grad")
        assert ws.words == [word] and abs(ws.scores[0]) == pytest.approx(1.0), ws.scores


def test_clip_relevance_baseline_and_the_cosine_one_under_its_names(world):
    model, enc = world["model"], world["encoders"]
    target = text_target(model, enc["clip_txt"], "a red bus")
    image = _square("clip_img", 9)
    rel = localize(model, enc["clip_img"], image, target, method="clip-relevance", text_encoder=enc["clip_txt"])
    assert rel.method == "clip-relevance" and float(rel.grid.max()) == pytest.approx(1.0)
    cos = localize(model, enc["clip_img"], image, target, method="clip-sim", text_encoder=enc["clip_txt"])
    assert cos.method == "clip-cosine"  # the earlier name maps onto the cosine map
    # relevance of CLIP's own similarity follows the caption, not the SAE latents of the target
    other = Target([5], [1.0], source="a red bus")
    again = localize(model, enc["clip_img"], image, other, method="clip-relevance", text_encoder=enc["clip_txt"])
    np.testing.assert_allclose(again.grid, rel.grid, atol=1e-6)
    sae = localize(model, enc["clip_img"], image, other, method="relevance", text_encoder=enc["clip_txt"])
    assert not np.allclose(sae.grid, rel.grid, atol=1e-3)
    with pytest.raises(AttributionError, match="needs the CLIP image tower"):
        localize(model, enc["dino"], _square("dino", 2), target, method="clip-relevance", text_encoder=enc["clip_txt"])


def test_concepts_are_chosen_by_name(world, tmp_path, capsys):
    from sparc_core.explain.naming import NamingError, latents_named, write_latent_names

    model = world["model"]
    ckpt = tmp_path / "ckpt"
    save_checkpoint(model, ckpt)
    named = {3: [("bus", 0.9)], 8: [("Bus ", 0.5)], 12: [("cat", 0.7)]}
    write_latent_names(ckpt, named, "words", "clip_txt", model.n_latents)
    from sparc_core.explain.naming import load_latent_names

    names = load_latent_names(ckpt)
    assert latents_named(names, "bus") == [3, 8] and latents_named(names, "cat") == [12]
    with pytest.raises(NamingError, match="no latent is named 'bu'.*'bus'"):
        latents_named(names, "bu")
    img = tmp_path / "q.png"
    _square("dino", 6).save(img)
    argv = ["localize", "--checkpoint", str(ckpt), *world["flags"], "--image", str(img), "--out", str(tmp_path / "h.png")]
    assert main([*argv, "--concept", "bus", "--json", str(tmp_path / "h.json")]) == 0
    assert [x["latent"] for x in json.loads((tmp_path / "h.json").read_text())["latents"]] == [3, 8]
    capsys.readouterr()
    assert main([*argv, "--concept", "zebra"]) == 2
    assert "no latent is named 'zebra'" in capsys.readouterr().err


def test_an_image_and_its_caption_explain_their_shared_latents(world, tmp_path, capsys):
    # The paper's Figure 5: per latent both codes agree on, where it is in the image and which words drive it.
    from sparc_core.explain.attribution import explain_pair, save_pair_png

    model, enc = world["model"], world["encoders"]
    image, caption = _patches("clip_img", {5: 1, 10: 2}), "a zebra next to the violin"
    with torch.no_grad():
        img = model.encode({"clip_img": enc["clip_img"].encode_images([image])}, code="agreed")
        txt = model.encode({"clip_txt": enc["clip_txt"].encode_texts([caption])}, code="agreed")
    on_img = dict(zip(img.indices[0].tolist(), img.values[0].tolist()))
    on_txt = dict(zip(txt.indices[0].tolist(), txt.values[0].tolist()))
    both = {i for i in on_img if on_img[i] > 0 and on_txt.get(i, 0) > 0}
    assert both  # random towers still share a few latents on this pair
    pair = explain_pair(model, enc["clip_img"], enc["clip_txt"], image, caption, max_latents=3)
    assert [c.latent for c in pair.concepts] == sorted(both, key=lambda i: -on_img[i] * on_txt[i])[:3]
    for c in pair.concepts:
        assert c.image_value == pytest.approx(on_img[c.latent]) and c.text_value == pytest.approx(on_txt[c.latent])
        ref = localize(model, enc["clip_img"], image, latent_target(model, [c.latent]))
        np.testing.assert_allclose(c.heatmap.grid, ref.grid, atol=1e-6)
        words = attribute_text(model, enc["clip_txt"], caption, latent_target(model, [c.latent]))
        assert c.words.words == caption.split() and np.allclose(c.words.scores, words.scores)
    assert set(pair.image_only) == {i for i, v in on_img.items() if v > 0} - both
    js = pair.to_json()
    assert [s["latent"] for s in js["shared"]] == [c.latent for c in pair.concepts] and len(js["shared"][0]["grid"]) == 16
    out = save_pair_png(pair, tmp_path / "pair.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[1] >= 200 * len(pair.concepts)
    with pytest.raises(AttributionError, match="max_latents"):
        explain_pair(model, enc["clip_img"], enc["clip_txt"], image, caption, max_latents=9)
    with pytest.raises(AttributionError, match="does not look for latents"):
        explain_pair(model, enc["clip_img"], enc["clip_txt"], image, caption, method="clip-cosine")
    # the CLI, with a caption that mathtext would choke on drawn as plain text
    img = tmp_path / "pair-in.png"
    image.save(img)
    argv = ["explain-pair", "--checkpoint", str(world["ckpt"]), *world["flags"], "--image", str(img), "--stream", "clip_img"]
    assert main([*argv, "--text", "a $\\foo$ zebra", "--out", str(tmp_path / "p.png"), "--json", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert "pair:" in printed or "share no agreed latent" in printed
    assert json.loads((tmp_path / "p.json").read_text())["caption"] == "a $\\foo$ zebra"


def test_captions_are_drawn_as_plain_text_not_mathtext(world, tmp_path):
    # "$\foo$" is a mathtext error under pyplot's defaults; pictures draw captions as the user wrote them
    model, enc = world["model"], world["encoders"]
    caption = "a $\\foo$ dog on a beach"
    ws = attribute_text(model, enc["clip_txt"], caption, method="grad")
    with Image.open(save_words_png(ws, tmp_path / "w.png")) as im:
        assert im.format == "PNG"
    hm = localize(model, enc["clip_img"], _square("clip_img", 1), text_target(model, enc["clip_txt"], caption))
    with Image.open(save_heatmap_png(hm, tmp_path / "h.png")) as im:
        assert im.size == HEATMAP_PNG_SIZE


@pytest.mark.parametrize("stream", ["dino", "clip_img"])
def test_frozen_towers_give_the_same_maps(world, stream):
    # the gradient starts at the pixels (and the caption's embeddings), not at the towers' weights: a tower
    # loaded for inference with requires_grad off must not give silently flat maps
    model, enc = world["model"], world["encoders"][stream]
    side = LAYOUTS[stream][0]
    image, blank = _square(stream, 9), Image.fromarray(np.full((side, side, 3), 120, np.uint8))
    target = latent_target(model, [_driven_latent(model, enc, image, blank)])
    txt = world["encoders"]["clip_txt"]
    towers = [p for m in (enc.model if stream == "dino" else enc.clip.model, txt.clip.model) for p in m.parameters()]
    live = {m: localize(model, enc, image, target, method=m).grid for m in ("relevance", "gradcam", "grad-x-input")}
    words = attribute_text(model, txt, "a zebra on a bus").scores
    try:
        for p in towers:
            p.requires_grad_(False)
        for method, want in live.items():
            got = localize(model, enc, image, target, method=method).grid
            assert float(got.max()) == pytest.approx(1.0), method  # not flat
            np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(attribute_text(model, txt, "a zebra on a bus").scores, words, atol=1e-5)
    finally:
        for p in towers:
            p.requires_grad_(True)


def test_relevance_from_the_last_block_and_the_joint_score(world):
    model, enc = world["model"], world["encoders"]["dino"]
    image, blank = _square("dino", 10), Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    target = latent_target(model, [_driven_latent(model, enc, image, blank)])
    every = localize(model, enc, image, target, method="relevance")
    last = localize(model, enc, image, target, method="relevance", start_layer=-1)
    assert int(last.grid.argmax()) == int(every.grid.argmax()) == 10  # both find the only textured patch
    assert not np.array_equal(last.grid, every.grid)  # and are different rollouts
    # the joint score counts a latent only where the image's top-k keeps it
    with torch.no_grad():
        logits = model.logits("dino", enc.encode_images([image]))[0]
    kept = int(logits.topk(model.k).indices[0])
    dropped = int(logits.argsort(descending=True)[model.k])  # fires (ReLU > 0) but is not in the top k
    assert float(logits[dropped]) > 0
    assert localize(model, enc, image, latent_target(model, [kept]), score="joint").target_fires
    assert localize(model, enc, image, latent_target(model, [dropped]), score="activation").target_fires
    assert not localize(model, enc, image, latent_target(model, [dropped]), score="joint").target_fires
    with pytest.raises(AttributionError, match="unknown score"):
        localize(model, enc, image, target, score="magic")


def test_clip_baselines_never_read_the_sae(world):
    # CLIP's own maps depend on the caption alone: a target with no latent still gives them, and says it fires
    model, enc = world["model"], world["encoders"]
    image = _square("clip_img", 3)
    for method in ("clip-relevance", "clip-cosine"):
        bare = Target([], [], source="a red bus")
        hm = localize(model, enc["clip_img"], image, bare, method=method, text_encoder=enc["clip_txt"])
        target = text_target(model, enc["clip_txt"], "a red bus")
        with_latents = localize(model, enc["clip_img"], image, target, method=method, text_encoder=enc["clip_txt"])
        assert hm.target_fires and float(hm.grid.max()) == pytest.approx(1.0)
        np.testing.assert_allclose(hm.grid, with_latents.grid, atol=1e-6)


# A CLIP image tower of the ResNet layout (open_clip's ModifiedResNet, as OpenAI's RN50): 128 px -> a 4 x 4
# layer4 grid of 32 px cells, read by the attention pool
CLIP_RN = {**tm.CLIP_CFG, "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64}}


@pytest.fixture(scope="module")
def rn_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("attr_rn")
    clip = tm.write_clip_dir(d / "clip", cfg=CLIP_RN, positions=False)
    encoders = load_encoders(EncodersConfig(clip=ClipConfig(weights=str(clip)), device="cpu"))
    assert type(encoders["clip_img"].clip.model.visual).__name__ == "ModifiedResNet"
    model = SparcModel(SparcConfig(streams={s: e.dim for s, e in encoders.items()}, n_latents=256, k=16, auxk=16), seed=0)
    placed = tm.write_clip_dir(d / "placed", seed=1, cfg=CLIP_RN)  # with its position embeddings: attention not uniform
    placed_enc = load_encoders(EncodersConfig(clip=ClipConfig(weights=str(placed)), device="cpu"))["clip_img"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh ResNet's last norm of every block is zero: spread the weights as training would
        for p in placed_enc.clip.model.visual.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return {"encoders": encoders, "model": model, "placed": placed_enc}


def _rn_image(textures: dict[int, int]) -> Image.Image:
    a = np.full((128, 128, 3), 120, np.uint8)
    for cell, seed in textures.items():
        r, c = divmod(cell, 4)
        a[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    return Image.fromarray(a)


def test_a_resnet_clip_tower_maps_find_the_only_region_that_drives_the_latent(rn_world):
    model, enc = rn_world["model"], rn_world["encoders"]["clip_img"]
    blank = _rn_image({})
    hits = {"relevance": 0, "gradcam": 0, "grad-x-input": 0}
    for cell in range(16):
        image = _rn_image({cell: cell})
        target = latent_target(model, [_driven_latent(model, enc, image, blank)])
        for method in hits:
            hm = localize(model, enc, image, target, method=method)
            assert hm.grid.shape == (4, 4) and hm.target_fires
            hits[method] += int(hm.grid.argmax()) == cell
    # convolutions spread a cell into its neighbours' layer4 tokens a little: still far above chance (1 of 16)
    assert min(hits.values()) >= 12, hits


def test_a_resnet_clip_towers_gradcam_is_layer4s_and_its_pool_is_unchanged(rn_world):
    # Grad-CAM computed by hand with a hook on layer4 (the classic ResNet layer), and the pool that the
    # heatmaps compute step by step gives the embedding the class's own forward gives, and is restored after
    model, enc = rn_world["model"], rn_world["placed"]
    image = _rn_image({5: 1, 10: 2})
    with torch.no_grad():
        strongest = int(model.logits("clip_img", enc.encode_images([image]))[0].argmax())
    target = latent_target(model, [strongest])
    visual = enc.clip.model.visual
    with torch.no_grad():
        before = enc.encode_images([image])
    hm = localize(model, enc, image, target, method="gradcam")
    assert "forward" not in vars(visual.attnpool)
    store = {}
    h = visual.layer4.register_forward_hook(lambda m, i, o: store.update(a=o))
    try:
        with torch.enable_grad():
            feats = enc.clip.model.encode_image(enc.preprocess(image)[None], normalize=True)
            score = (torch.relu(model.logits("clip_img", feats)) * target.tensor(model.n_latents, model.device)).sum()
            (g,) = torch.autograd.grad(score, [store["a"]])
    finally:
        h.remove()
    act, grad = store["a"][0].detach(), g[0]  # [C, 4, 4]
    cam = (act * grad.mean((1, 2), keepdim=True)).sum(0).clamp_min(0)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    assert float(cam.max()) == 1.0 and float(cam.min()) == 0.0  # not a flat map
    torch.testing.assert_close(torch.from_numpy(hm.grid), cam, atol=1e-4, rtol=1e-4)
    from sparc_core.explain.attribution.hooks import _Recorder, _resnet_attention

    with torch.no_grad(), _resnet_attention(visual, _Recorder(), {}):
        inside = enc.encode_images([image])
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-4)


def test_a_resnet_clip_towers_own_baselines_follow_the_caption(rn_world):
    model, enc = rn_world["model"], rn_world["encoders"]
    image = _rn_image({6: 3, 9: 4})
    for method in ("clip-relevance", "clip-cosine"):
        bare = localize(model, enc["clip_img"], image, Target([], [], source="a red bus"), method, enc["clip_txt"])
        other = localize(model, enc["clip_img"], image, Target([], [], source="a green cat"), method, enc["clip_txt"])
        assert bare.target_fires and bare.grid.shape == (4, 4) and float(bare.grid.max()) == pytest.approx(1.0)
        assert not np.allclose(bare.grid, other.grid, atol=1e-3), method  # the caption moves the map
    sae = localize(model, enc["clip_img"], image, text_target(model, enc["clip_txt"], "a red bus"), "relevance")
    rel = localize(model, enc["clip_img"], image, Target([], [], source="a red bus"), "clip-relevance", enc["clip_txt"])
    assert not np.allclose(sae.grid, rel.grid, atol=1e-3)
