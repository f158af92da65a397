"""Named latents: scored against the planted concepts of a synthetic world, written beside the checkpoint,
and found by the commands that show latents."""

from __future__ import annotations

import json

import numpy as np

from sparc_core import SparcConfig, load_checkpoint
from sparc_core.checkpoint import checkpoint_hash
from sparc_core.explain.naming import load_latent_names, name_latents, naming_score, write_latent_names
from sparc_core.worlds.synthetic import PlantedConcepts

from .conftest import MEDIUM


def _world(medium_synth):
    meta = json.loads((medium_synth / "synth.json").read_text())
    from sparc_core.config import SynthConfig

    return PlantedConcepts(SynthConfig.model_validate(meta["config"]))


def test_names_from_concept_vectors_match_the_planted_concepts(trained_checkpoint, medium_synth):
    world, model = _world(medium_synth), load_checkpoint(trained_checkpoint)
    names = [f"concept-{c}" for c in range(world.cfg.n_concepts)]
    named = name_latents(model, "clip_txt", world.concept_vectors("clip_txt"), names, top=3)
    assert named and all(1 <= len(v) <= 3 for v in named.values())
    assert all(v[0][1] >= v[-1][1] for v in named.values())  # best first
    # the truth comes from another stream: names read off the text tower must hold for DINO's codes
    feats = np.load(medium_synth / "eval" / "dino.npy")
    labels = np.load(medium_synth / "eval" / "labels.npy")
    import torch

    code = model.encode({"dino": torch.from_numpy(feats)})
    score = naming_score(named, code.indices.numpy(), code.values.numpy(), labels, names)
    assert score["scored_latents"] >= 20
    assert score["top1"] >= 0.6, score  # chance: 1 in 48
    # a model that learnt nothing names at chance
    from sparc_core import SparcModel

    rand = SparcModel(SparcConfig(streams=MEDIUM, n_latents=192, k=8, auxk=32), seed=1)
    rnamed = name_latents(rand, "clip_txt", world.concept_vectors("clip_txt"), names)
    rand.fit_input_norm({s: torch.from_numpy(np.load(medium_synth / "eval" / f"{s}.npy")) for s in MEDIUM})
    rcode = rand.encode({"dino": torch.from_numpy(feats)})
    assert naming_score(rnamed, rcode.indices.numpy(), rcode.values.numpy(), labels, names)["top1"] < 0.3


def test_names_file_is_tied_to_the_checkpoint(trained_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint, ckpt)
    write_latent_names(ckpt, {3: [("dog", 0.9), ("puppy", 0.5)], 7: [("bus", 0.4)]}, "words.txt", "clip_txt", 192)
    data = json.loads((ckpt / "latent_names.json").read_text())
    assert data["checkpoint_sha256"] == checkpoint_hash(ckpt) and data["latents"]["3"][1]["name"] == "puppy"
    assert load_latent_names(ckpt) == {3: "dog", 7: "bus"}
    data["checkpoint_sha256"] = "0" * 64  # names of another model are never shown
    (ckpt / "latent_names.json").write_text(json.dumps(data))
    assert load_latent_names(ckpt) == {}


def test_name_latents_cli_with_a_tiny_clip(tmp_path, capsys):
    from sparc_core import SparcModel, save_checkpoint
    from sparc_core.cli import main
    from sparc_core.encoders import tiny as tm

    clip = tm.write_clip_dir(tmp_path / "clip")
    model = SparcModel(SparcConfig(streams={"clip_img": 16, "clip_txt": 16}, n_latents=64, k=8, auxk=8), seed=0)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    vocab = tmp_path / "words.txt"
    vocab.write_text("\n".join(["dog", "cat", "red bus", "balloons", "a small boat", "mountain", "dog"]) + "\n")
    assert main(["name-latents", "--checkpoint", str(ckpt), "--vocab", str(vocab), "--clip-weights", str(clip)]) == 0
    assert "named" in capsys.readouterr().out
    names = load_latent_names(ckpt)
    assert names and set(names.values()) <= {"dog", "cat", "red bus", "balloons", "a small boat", "mountain"}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    assert main(["name-latents", "--checkpoint", str(ckpt), "--vocab", str(empty), "--clip-weights", str(clip)]) == 2
    assert "no vocabulary entries" in capsys.readouterr().err
