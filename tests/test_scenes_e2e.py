"""The whole product on rendered scenes, CI-sized, through the commands a user runs: scenes -> towers ->
extract -> train -> index build -> serve (gRPC text query against the DINO index) -> name-latents ->
localize / attribute / explain-pair -> report. Tiny towers and few steps: this checks that every stage
hands the next what it needs; bench/scenes.py measures quality at full size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparc_core.cli import main
from sparc_core.worlds.scenes import CONCEPTS, read_scene_records
from sparc_core.worlds.towers import TowerSizes, encoders_config, extract_flags, train_towers

TINY = TowerSizes(image_size=56, patch=14, width=32, depth=2, heads=2, text_width=32, text_depth=1, text_heads=2, embed_dim=16)


@pytest.mark.slow
def test_scenes_to_served_search_localisation_and_report(tmp_path, capsys):
    scenes = tmp_path / "scenes"
    assert main(["scenes", "--out", str(scenes), "--n", "160", "--size", "56", "--quiet"]) == 0
    towers = train_towers(scenes, tmp_path / "towers", sizes=TINY, n_test=40, dino_steps=20, clip_steps=20, progress=False)
    flags = extract_flags(towers)
    feats = tmp_path / "features"
    argv = ["extract", "--images", str(scenes / "images"), "--captions", str(scenes / "captions.csv"), "--out", str(feats)]
    assert main([*argv, *flags, "--workers", "0", "--quiet"]) == 0
    streams = ("dino", "clip_img", "clip_txt")
    assert all(np.load(feats / f"{s}.npy").shape[0] == 160 for s in streams)
    ckpt = tmp_path / "model"
    train_argv = ["train", "--out", str(ckpt), "--steps", "40", "--n-latents", "128", "--quiet"]
    for s in streams:
        train_argv += ["--features", f"{s}={feats / f'{s}.npy'}"]
    assert main(train_argv) == 0
    bundle = tmp_path / "bundle-dino"
    ids = feats / "ids.txt"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--stream", "dino", "--features", str(feats / "dino.npy"),
                 "--ids", str(ids), "--out", str(bundle), "--quiet"]) == 0  # fmt: skip
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(CONCEPTS) + "\n")
    assert main(["name-latents", "--checkpoint", str(ckpt), "--vocab", str(vocab), *flags]) == 0

    # served: a text query over gRPC against the DINO index, explained with named latents
    from service.client import SparcClient, make_query, search_request
    from service.server import SparcServer
    from service.settings import load_settings

    enc = encoders_config(towers).model_dump()
    settings = load_settings(
        overrides={"checkpoint": str(ckpt), "indexes": {"scenes": [str(bundle)]}, "port": 0, "metrics_port": 0, "encoders": enc},
        environ={},
    )
    server = SparcServer(settings).start()
    records = {r["id"]: r for r in read_scene_records(scenes)}
    try:
        with SparcClient(f"127.0.0.1:{server.port}") as client:
            res = client.search(search_request(make_query(text="a red star"), ["scenes"], top_k=5, explain=True))
            assert len(res.hits) == 5 and all(h.id in records for h in res.hits)
            assert any(e.name in CONCEPTS for h in res.hits for e in h.explanation)  # names from name-latents
    finally:
        server.stop(0)

    scene = next(r for r in records.values() if len(r["objects"]) >= 2)
    image = scenes / "images" / f"{scene['id']}.png"
    obj = scene["objects"][0]
    base = ["--checkpoint", str(ckpt), *flags, "--image", str(image)]
    assert main(["localize", *base, "--text", f"a {obj['colour']} {obj['shape']}", "--out", str(tmp_path / "h.png"),
                 "--json", str(tmp_path / "h.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "h.json").read_text())["shape"] == [4, 4]  # 56 px at patch 14
    assert main(["explain-pair", *base, "--text", scene["caption"], "--out", str(tmp_path / "p.png")]) == 0
    assert (
        main(["attribute", "--checkpoint", str(ckpt), *flags, "--text", scene["caption"], "--out", str(tmp_path / "w.png")]) == 0
    )
    assert main(["report", "--checkpoint", str(ckpt), "--index", f"scenes={bundle}", "--captions", str(scenes / "captions.csv"),
                 "--images", str(scenes / "images"), "--max-latents", "5", "--heatmaps", "1", *flags,
                 "--out", str(tmp_path / "report")]) == 0  # fmt: skip
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("class='latent'") >= 1 and any(c in page for c in CONCEPTS)
    assert page.count("class='heatmap'") >= 1  # the concept report shows each latent's heatmap on its top scene
    capsys.readouterr()
