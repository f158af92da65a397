"""`sparc report`: a static HTML concept page from a checkpoint and its bundles, rendered in headless Chromium
where Debian's chromium is installed (skipped, saying so, where it is not)."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from index import build_bundle
from sparc_core.cli import main
from sparc_core.explain.naming import write_latent_names

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(trained_checkpoint, medium_synth, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    ckpt = d / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    write_latent_names(ckpt, {i: [(f"thing-{i}", 0.9), (f"other-{i}", 0.5)] for i in range(192)}, "v", "clip_txt", 192)
    n = len(np.load(medium_synth / "eval" / "dino.npy"))
    (d / "images").mkdir()
    with open(d / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption", "id"])
        for i in range(n):
            if i < 40:  # a few items have pictures
                Image.new("RGB", (32, 24), (i * 6, 100, 200)).save(d / "images" / f"{i}.png")
            w.writerow([f"{i}.png", f"caption of item {i}", str(i)])
    build_bundle(ckpt, "dino", medium_synth / "eval" / "dino.npy", d / "b-dino", progress=False)
    build_bundle(ckpt, "clip_img", medium_synth / "eval" / "clip_img.npy", d / "b-img", progress=False, dense=False)
    argv = ["report", "--checkpoint", str(ckpt), "--index", f"photos-dino={d / 'b-dino'}"]
    argv += ["--index", f"photos-clip={d / 'b-img'}"]
    argv += ["--captions", str(d / "captions.csv"), "--images", str(d / "images"), "--out", str(d / "out")]
    assert main(argv) == 0
    return d / "out"


def test_report_holds_names_rates_and_top_items(report):
    page = (report / "index.html").read_text()
    cards = re.findall(r"<div class='latent' id='latent-(\d+)'>", page)
    assert len(cards) >= 20
    first = cards[0]
    card = page.split(f"id='latent-{first}'>")[1].split("<div class='latent'")[0]
    assert f"thing-{first}" in card and f"other-{first}" in card  # its names
    assert "dino:" in card and "clip_img:" in card  # per-stream rates
    assert "top items of <b>photos-dino</b>" in card and "caption of item" in card
    with Image.open(report / "overview.png") as im:
        assert im.format == "PNG"
    thumbs = list((report / "thumbs").glob("*.jpg"))
    assert thumbs and all(Image.open(t).size[0] <= 96 for t in thumbs)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed here: the rendering check is skipped")
def test_report_renders_in_headless_chromium(report, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    flags += ["--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (report / "index.html").as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'id="overview"' in dom and dom.count('class="latent"') >= 20
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1000,800", url], capture_output=True, timeout=120)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape[:2] == (800, 1000) and px.std() > 5  # something was drawn, not a blank page
