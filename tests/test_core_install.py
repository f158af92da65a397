"""The core install (no extras): train, build a sparse index, serve and answer vector queries, with every
optional library unimportable; a feature that needs an extra says which one to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

EXTRAS = ("open_clip", "timm", "torchvision", "matplotlib", "h5py", "faiss", "grpc_tools", "pymilvus", "seismic")

SCRIPT = textwrap.dedent(
    f"""
    import sys
    for name in {EXTRAS!r}:
        sys.modules[name] = None  # as if the extra were not installed: importing it raises ImportError
    import numpy as np
    from pathlib import Path
    out = Path(sys.argv[1])
    from sparc_core import TrainConfig, train
    from sparc_core.worlds.synthetic import write_synthetic
    from sparc_core.config import SynthConfig, ClipConfig, EncodersConfig
    paths = write_synthetic(SynthConfig(n_train=600, n_eval=100, n_concepts=40,
                                         streams={{"dino": 24, "clip_img": 16, "clip_txt": 16}}), out / "data")
    feats = {{s: str(out / "data" / "train" / f"{{s}}.npy") for s in ("dino", "clip_img", "clip_txt")}}
    ckpt = train(TrainConfig(features=feats, out=str(out / "ckpt"), n_latents=64, k=6, steps=30, batch_size=64,
                             val_rows=50, eval_every=15, progress=False, device="cpu"))
    from index import build_bundle, read_manifest
    bundle = out / "bundle"
    build_bundle(ckpt, "dino", out / "data" / "eval" / "dino.npy", bundle, progress=False)
    assert not read_manifest(bundle).dense  # no FAISS: the sparse index only
    from service.server import SparcServer
    from service.settings import load_settings
    from service.client import SparcClient, make_query, search_request
    srv = SparcServer(load_settings(overrides={{"checkpoint": str(ckpt), "indexes": {{"g": [str(bundle)]}},
                                               "port": 0, "metrics_port": 0}}, environ={{}})).start()
    q = np.load(out / "data" / "eval" / "clip_txt.npy")[0]
    with SparcClient(f"127.0.0.1:{{srv.port}}") as c:
        assert c.search(search_request(make_query(stream="clip_txt", vector=q), ["g"], top_k=3)).hits
    srv.stop(0)
    from sparc_core.encoders import load_encoders
    from sparc_core.extras import MissingExtra
    try:
        load_encoders(EncodersConfig(clip=ClipConfig(weights=str(out)), device="cpu"))
    except MissingExtra as e:
        print("ENCODERS:", e)
    from sparc_core.explain.attribution.drawing import _figure
    try:
        _figure(1, 1)
    except MissingExtra as e:
        print("PLOTS:", e)
    print("CORE OK")
    """
)


def test_the_core_install_trains_indexes_and_serves_without_any_extra(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert "CORE OK" in out.stdout, out.stdout + out.stderr
    assert "ENCODERS: CLIP encoders need open_clip, which is not installed: pip install 'sparc[encoders]'" in out.stdout
    plots = "PLOTS: pictures (heatmaps, word scores) need matplotlib, which is not installed: pip install 'sparc[plots]'"
    assert plots in out.stdout


def test_flags_mean_one_thing_across_commands_and_earlier_spellings_still_parse(capsys):
    """--top-k is only ever a hit count; the flags that meant names per latent, strongest latents and the
    TopK kind have their own names, and their earlier spellings parse to the same values, unadvertised."""
    from sparc_core.cli import build_parser

    p = build_parser()
    for argv, dest, want in (
        (["name-latents", "--checkpoint", "c", "--vocab", "v", "--names-per-latent", "3"], "top", 3),
        (["name-latents", "--checkpoint", "c", "--vocab", "v", "--top", "4"], "top", 4),
        (["name-latents", "--checkpoint", "c", "--vocab", "v"], "top", 5),
        (["localize", "--checkpoint", "c", "--image", "i", "--text", "t", "--out", "o", "--max-latents", "2"], "top", 2),
        (["localize", "--checkpoint", "c", "--image", "i", "--text", "t", "--out", "o", "--top", "6"], "top", 6),
        (["localize", "--checkpoint", "c", "--image", "i", "--text", "t", "--out", "o"], "top", None),
        (["train", "--selection", "local"], "topk", "local"),
        (["train", "--topk", "local"], "topk", "local"),
        (["train"], "topk", None),
    ):
        assert getattr(p.parse_args(argv), dest) == want, argv
    for cmd, shown, hidden in (("name-latents", "--names-per-latent", "--top "), ("localize", "--max-latents", "--top "),
                               ("train", "--selection", "--topk")):  # fmt: skip
        with pytest.raises(SystemExit):
            p.parse_args([cmd, "--help"])
        out = capsys.readouterr().out
        assert shown in out and hidden not in out, (cmd, out)
