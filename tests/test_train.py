"""Training end to end on CPU: the CLI, exact resume, determinism, and 2-process data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from sparc_core import TrainConfig, load_checkpoint, train
from sparc_core.checkpoint import read_checkpoint_config
from sparc_core.cli import main
from sparc_core.train import METRICS_LOG

from .conftest import feature_paths

TINY = {
    "n_latents": 64,
    "k": 6,
    "auxk": 16,
    "private_latents": 32,
    "private_k": 4,
    "batch_size": 64,
    "eval_every": 10,
    "save_every": 10,
    "val_rows": 200,
    "warmup_steps": 2,
    "block_size": 256,
    "dead_after": 640,
    "revive_after": 1280,
    "progress": False,
}


def _cfg(synth_dir: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        features=feature_paths(synth_dir), labels=str(synth_dir / "train" / "labels.npy"), out=str(out), **(TINY | kw)
    )


def _params(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(path).state_dict())


def test_cli_train_writes_checkpoint_metrics_and_curves(synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(out),
        "--steps",
        "20",
        "--n-latents",
        "64",
        "--k",
        "6",
        "--batch-size",
        "64",
        "--eval-every",
        "10",
        "--quiet",
        "--labels",
        str(synth_dir / "train" / "labels.npy"),
    ]
    for s, p in feature_paths(synth_dir).items():
        args += ["--features", f"{s}={p}"]
    assert main(args) == 0
    from sparc_core.checkpoint import resolve_checkpoint

    assert {"CURRENT", "metrics.json", "metrics.jsonl", "training_curves.png"} <= {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "metrics.json", "train_state.safetensors"} == {
        p.name for p in resolve_checkpoint(out).iterdir()
    }
    # a second run into the same --out is refused unless it resumes or overwrites
    assert main(args) == 2
    assert "already holds a checkpoint: pass --resume" in capsys.readouterr().err
    log = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "val"] == [10, 20]
    assert all(set(r["dead_pct"]) == {"dino", "clip_img", "clip_txt"} for r in log if r["kind"] == "train")
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 20
    # the logged validation numbers are those of the saved model on the held-out rows, recomputed here
    import numpy as np

    from sparc_core.metrics import evaluate

    feats = {s: np.load(p) for s, p in feature_paths(synth_dir).items()}
    n_val = min(2048, len(feats["dino"]) // 5)  # TrainConfig.val_rows, at most a fifth of the rows
    val = {s: x[-n_val:] for s, x in feats.items()}
    labels = np.load(synth_dir / "train" / "labels.npy")[-n_val:]
    again = evaluate(load_checkpoint(out), val, labels=labels, gallery=min(1000, n_val))["summary"]
    for key in ("mean_jaccard", "mean_label_jaccard", "mean_R@1_latent", "max_dead_fraction"):
        assert metrics["val"][key] == pytest.approx(again[key], abs=1e-6), key


def test_cli_reports_bad_input_clearly(synth_dir, tmp_path, capsys):
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "x"),
            "--features",
            f"dino={tmp_path / 'missing.npy'}",
            "--features",
            f"clip_txt={feature_paths(synth_dir)['clip_txt']}",
            "--quiet",
        ]
    )
    assert code == 2
    assert "missing.npy: feature file not found" in capsys.readouterr().err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 10\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "y")]) == 2
    assert "learning_rate: unknown key" in capsys.readouterr().err


def test_training_reduces_loss_and_is_deterministic(synth_dir, tmp_path):
    a = train(_cfg(synth_dir, tmp_path / "a", steps=40, lr=1e-2))
    b = train(_cfg(synth_dir, tmp_path / "b", steps=40, lr=1e-2))
    pa, pb = _params(a), _params(b)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    log = [json.loads(ln) for ln in (a / "metrics.jsonl").read_text().splitlines() if '"train"' in ln]
    assert log[-1]["self"] < 0.6 * log[0]["self"] and log[-1]["cross"] < 0.6 * log[0]["cross"]


def test_resume_reproduces_an_uninterrupted_run(synth_dir, tmp_path, monkeypatch):
    from sparc_core.train import Trainer

    full = train(_cfg(synth_dir, tmp_path / "full", steps=30))
    part = tmp_path / "part"
    save = Trainer._save

    def crash_after_step_20(self, step, metrics):
        save(self, step, metrics)
        if step == 20:
            raise KeyboardInterrupt  # the run dies right after its step-20 checkpoint

    monkeypatch.setattr(Trainer, "_save", crash_after_step_20)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synth_dir, part, steps=30))
    monkeypatch.undo()
    assert read_checkpoint_config(part)["step"] == 20
    resumed = train(_cfg(synth_dir, part, steps=30), resume=True)
    pf, pr = _params(full), _params(resumed)
    for name in pf:
        assert_close(pr[name], pf[name], rtol=1e-5, atol=1e-6, msg=name)
    log = [json.loads(ln) for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [10, 20, 30]  # the resumed log has no repeats


def test_resume_refuses_a_different_model(synth_dir, tmp_path):
    from sparc_core import CheckpointError

    out = tmp_path / "r"
    train(_cfg(synth_dir, out, steps=10))
    with pytest.raises(CheckpointError, match="cannot resume, the checkpoint has k=6"):
        train(_cfg(synth_dir, out, steps=20, k=8), resume=True)
    # every model setting counts, the activation floor included
    with pytest.raises(CheckpointError, match="min_rel_activation"):
        train(_cfg(synth_dir, out, steps=20, min_rel_activation=0.3), resume=True)


@pytest.mark.slow
def test_two_process_data_parallel_matches_single_process(synth_dir, tmp_path):
    single = train(_cfg(synth_dir, tmp_path / "single", steps=12, save_every=12, eval_every=12))
    out = tmp_path / "ddp"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "sparc_core.cli",
        "train",
        "--out",
        str(out),
        "--steps",
        "12",
        "--n-latents",
        "64",
        "--k",
        "6",
        "--auxk",
        "16",
        "--batch-size",
        "64",
        "--eval-every",
        "12",
        "--save-every",
        "12",
        "--quiet",
        "--device",
        "cpu",
    ]
    for s, p in feature_paths(synth_dir).items():
        args += ["--features", f"{s}={p}"]
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(
        "val_rows: 200\nblock_size: 256\ndead_after: 640\nrevive_after: 1280\nprivate_latents: 32\nprivate_k: 4\n"
    )
    args += ["--config", str(cfg_file), "--labels", str(synth_dir / "train" / "labels.npy")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ps, pd = _params(single), _params(out)
    for name in ps:  # the same global batch split over 2 ranks, gradients averaged: the same model
        assert_close(pd[name], ps[name], rtol=1e-4, atol=1e-5, msg=name)


def test_cli_eval_writes_a_report(trained_checkpoint, medium_synth, tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["eval", "--checkpoint", str(trained_checkpoint), "--gallery", "300", "--out", str(out)]
    for s in ("dino", "clip_img", "clip_txt"):
        args += ["--features", f"{s}={medium_synth / 'eval' / f'{s}.npy'}"]
    assert main([*args, "--labels", str(medium_synth / "eval" / "labels.npy")]) == 0
    report = json.loads(out.read_text())
    assert report["n_samples"] == 600 and report["gallery"] == 300
    pair = report["pairs"]["clip_txt->dino"]
    assert {"nmse_cross", "jaccard", "label_jaccard", "retrieval_latent", "retrieval_latent_topk", "retrieval_xrecon"} <= set(
        pair
    )
    assert pair["retrieval_latent"]["R@1"] > 0.1  # chance is 1/300
    printed = capsys.readouterr().out
    assert "R@1, latent cosine, search code (served)" in printed and "R@1, latent cosine, plain top-k code" in printed
    bad = ["eval", "--checkpoint", str(trained_checkpoint), "--features", f"dino={medium_synth / 'eval' / 'clip_txt.npy'}"]
    assert main(bad) == 2
    assert "stream 'dino' has dim 48, expected 64" in capsys.readouterr().err


def test_revival_keeps_stream_private_latents_and_gives_revived_ones_a_real_scale(synth_dir, tmp_path):
    from sparc_core.train import Trainer

    trainer = Trainer(_cfg(synth_dir, tmp_path / "rv", steps=5, min_rel_activation=0.3))
    model, streams = trainer.model, trainer.model.streams
    rows = trainer.batcher.batch(0)
    batch = {s: torch.from_numpy(x) for s, x in trainer.data.read(rows).items()}
    out = model(batch)
    before = {s: model.codecs[s].W_enc.detach().clone() for s in streams}
    over = trainer.cfg.revive_after + 1
    trainer.dead_counters[streams[0]][3] = over  # latent 3: dead in one stream only (alive elsewhere)
    for s in streams:
        trainer.dead_counters[s][5] = over  # latent 5: dead in every stream
    assert trainer._revive(0, batch, out) == 1
    for s in streams:
        assert torch.equal(model.codecs[s].W_enc[3], before[s][3])  # a private concept survives
        assert not torch.equal(model.codecs[s].W_enc[5], before[s][5])
        # The revived latent's logit on its sample reaches the selection threshold (the k-th largest
        # logit, before the activation floor), not a tiny fraction of it, so it can compete for a slot.
        logits = model.logits(s, batch[s]).detach()
        kth = logits[:, [i for i in range(model.n_latents) if i != 5]].topk(model.k, dim=1).values[:, -1]
        assert float(logits[:, 5].max()) >= 0.5 * float(kth.mean())
        assert float(logits[:, 5].max()) <= 3.0 * float(logits.max(dim=1).values.mean())  # without taking over


def test_unused_latents_are_pruned_at_the_end_and_the_run_resumes_on_the_kept_dictionary(synth_dir, tmp_path):
    import numpy as np

    from sparc_core.metrics import encode_alone

    out = tmp_path / "big"
    cfg = _cfg(synth_dir, out, steps=20, n_latents=2048, min_rel_activation=0.4)
    train(cfg)
    model = load_checkpoint(out)
    record = json.loads((out / "metrics.json").read_text())["dictionary"]
    assert record["requested"] == 2048 and record["kept"] == model.n_latents < 2048
    # every kept latent fires on the training rows when some stream is encoded alone
    feats = {s: np.load(p) for s, p in feature_paths(synth_dir).items()}
    fired = torch.zeros(model.n_latents, dtype=torch.bool)
    for code in encode_alone(model, feats).values():
        fired[code.indices[code.active]] = True
    assert bool(fired.all())
    train(cfg.model_copy(update={"steps": 25}), resume=True)  # continues on the kept latents
    assert load_checkpoint(out).n_latents <= model.n_latents


def test_latents_that_win_slots_but_never_agree_are_pruned_from_a_calibrated_model(synth_dir, tmp_path):
    """A latent that wins top-k slots in every stream but never reaches its threshold is in no agreed code:
    no name or explanation can use it, so pruning drops it like a latent that never fires."""
    from sparc_core.calibrate import NEVER
    from sparc_core.train import Trainer

    trainer = Trainer(_cfg(synth_dir, tmp_path / "pr", steps=20, prune_unused=False, calibrate_rounds=0))
    trainer.run()
    model = trainer.model
    feats = {s: torch.from_numpy(x) for s, x in trainer.data.read(trainer._calibration_rows(2048)).items()}
    fires = sum(torch.bincount(model.encode({s: x}, code="full").indices.flatten(), minlength=model.n_latents)
                for s, x in feats.items())  # fmt: skip
    busiest, second = fires.topk(2).indices.tolist()  # win the most top-k slots: the search-code rule keeps both
    thresholds = torch.zeros(model.n_latents)
    thresholds[busiest] = NEVER
    model.set_thresholds({s: thresholds for s in model.streams})
    model.set_soft_weight(1.0)  # the search code holds every top-k latent, agreed or not
    enc = model.codecs[model.streams[0]]
    rows = {i: enc.W_enc[i].detach().clone() for i in (busiest, second)}
    pruned = trainer._prune()
    assert pruned["rarely_agreed"] == 1 and pruned["kept"] < pruned["requested"]
    kept = model.codecs[model.streams[0]].W_enc.detach()
    assert len(kept) == pruned["kept"]
    assert not any(torch.equal(rows[busiest], r) for r in kept)  # never agreed: dropped
    assert any(torch.equal(rows[second], r) for r in kept)  # agreed as often: kept


def test_cli_errors_are_one_clear_line(synth_dir, trained_checkpoint, medium_synth, tmp_path, capsys):
    paths = feature_paths(synth_dir)
    one = next(iter(paths.items()))
    assert main(["train", "--features", f"{one[0]}={one[1]}", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs paired features of at least 2 streams" in err[0]
    for anchors, why in ((["dinov2"], "are not streams"), (list(paths), "some, not all")):
        out = tmp_path / "anchored"
        argv = ["train", *[a for s, p in paths.items() for a in ("--features", f"{s}={p}")], "--out", str(out), "--quiet"]
        config = tmp_path / "anchored.yaml"
        config.write_text("align_anchor: [" + ", ".join(anchors) + "]\n")
        assert main([*argv, "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "align_anchor" in err[0] and why in err[0], err
        assert not (out / "CURRENT").exists()
    # a stream the checkpoint does not have is an error, and the previous report is left alone
    report = Path(trained_checkpoint) / "eval_report.json"
    report.write_text("{}")
    argv = ["eval", "--checkpoint", str(trained_checkpoint), "--features", f"dino={medium_synth / 'eval' / 'dino.npy'}"]
    assert main([*argv, "--features", f"clip_text={medium_synth / 'eval' / 'clip_txt.npy'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stream(s) ['clip_text'] that the checkpoint does not have" in err[0]
    assert report.read_text() == "{}"


def test_the_package_train_is_callable_after_its_module_is_imported(tmp_path, synth_dir):
    """``sparc_core.train`` is the function and the module; importing the module first (as ``sparc train``
    does) must not leave the package's ``train`` uncallable. A fresh interpreter: here both are cached."""
    cfg = _cfg(synth_dir, tmp_path / "ck", steps=3, eval_every=3, save_every=3)
    code = (
        "import sys, sparc_core.train, sparc_core; from sparc_core import TrainConfig, train; "
        "print(train(TrainConfig.model_validate_json(sys.argv[1])))"
    )
    run = subprocess.run([sys.executable, "-c", code, cfg.model_dump_json()], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(tmp_path / "ck") and load_checkpoint(tmp_path / "ck").k == TINY["k"]


def test_revival_watch_stops_after_a_round_that_dies_again_and_only_then():
    from sparc_core.train import RevivalWatch

    alive = torch.zeros(100, dtype=torch.bool)
    alive[:40] = True  # latents 0-39 fire, 40-99 are dead again
    w = RevivalWatch(100, min_survival=0.5)
    w.revived(torch.arange(0, 20), step=10)  # 20 revived, all of which survive
    assert w.judge(14, alive, after=5) is None  # not due yet
    assert w.judge(15, alive, after=5) == {"judged": 20, "survived": 20, "share": 1.0, "stopped": False}
    assert w.stopped_at is None
    w.revived(torch.arange(30, 70), step=20)  # 40 revived: 10 alive, 30 dead again
    assert w.judge(24, alive, after=5) is None
    verdict = w.judge(25, alive, after=5)
    assert verdict == {"judged": 40, "survived": 10, "share": 0.25, "stopped": True} and w.stopped_at == 26
    # the round closes only with ROUND latents judged while others are pending
    w2 = RevivalWatch(100, min_survival=0.5)
    w2.revived(torch.arange(50, 60), step=0)
    w2.revived(torch.arange(60, 100), step=3)
    assert w2.judge(5, alive, after=5) is None  # 10 judged (all dead), 40 pending: below a round
    assert w2.judge(8, alive, after=5)["judged"] == 50
    # 0 never stops; the state survives a save (meta + tensor) and pruning slices it
    w3 = RevivalWatch(100, min_survival=0.0)
    w3.revived(torch.arange(50, 100), step=0)
    assert w3.judge(5, alive, after=5)["stopped"] is False and w3.stopped_at is None
    w.revived(torch.tensor([99]), step=30)
    back = RevivalWatch.restored(100, 0.5, {"revival.at": w.at.clone()}, {"revival": w.meta()})
    assert back.stopped_at == 26 and int(back.at[99]) == 30 and back.history == w.history
    back.keep(np.array([0, 99]))
    assert back.at.tolist() == [-1, 30]


def test_revival_stops_when_a_round_dies_again_ends_at_revive_until_and_the_stop_survives_resume(synth_dir, tmp_path):
    """A dictionary far larger than the world's concepts, and a gate that asks every re-initialised latent
    to live: revival stops at its first judged round and a resumed run keeps it stopped; without the gate
    it goes on, and never past revive_until of the steps."""
    from sparc_core.train import Trainer

    out = tmp_path / "wide"
    over = {"n_latents": 1024, "auxk": 64, "steps": 60, "save_every": 60, "eval_every": 1000, "prune_unused": False}
    gate = {"revive_min_survival": 0.99, "revive_until": 1.0, "log_every": 1}  # only the gate stops revival
    train(_cfg(synth_dir, out, **over, **gate))
    log = [json.loads(ln) for ln in (out / METRICS_LOG).read_text().splitlines()]
    rounds = [r for r in log if r.get("kind") == "revival"]
    assert rounds and rounds[0]["share"] < 0.99 and rounds[0]["stopped"], rounds
    stop = rounds[0]["step"]
    revived_after = [r["revived"] for r in log if r.get("kind") == "train" and r["step"] > stop]
    assert revived_after and not any(revived_after)  # no latent re-initialised after the stop
    trainer = Trainer(_cfg(synth_dir, out, **(over | {"steps": 70}), **gate), resume=True)
    assert trainer.revival.stopped_at == stop
    for s in trainer.model.streams:
        trainer.dead_counters[s][:] = 10**9  # every latent long dead: a running revival would take them all
    rows = trainer.batcher.batch(60)
    batch = {s: torch.from_numpy(x) for s, x in trainer.data.read(rows).items()}
    assert trainer._revive(60, batch, trainer.model(batch)) == 0
    # without the gate (min survival 0) the same run keeps re-initialising, up to 80% of the steps (48)
    out2 = tmp_path / "wide-always"
    train(_cfg(synth_dir, out2, **over, revive_min_survival=0.0))
    log2 = {r["step"]: r for r in map(json.loads, (out2 / METRICS_LOG).read_text().splitlines()) if r.get("kind") == "train"}
    assert log2[50]["revived"] > 0 and log2[60]["revived"] == 0
    assert not any(json.loads(ln).get("stopped") for ln in (out2 / METRICS_LOG).read_text().splitlines())


def test_earlier_setting_names_still_load_with_a_deprecation_warning(synth_dir, tmp_path):
    """One word for one idea ("alone": a stream encoded by itself); config files, flags and calls written
    with the earlier "solo" keep working and say what the name is now."""
    from sparc_core.cli import build_parser
    from sparc_core.model import SparcModel

    with pytest.warns(DeprecationWarning, match="'solo_select_prob' is now called 'alone_select_prob'"):
        cfg = TrainConfig(features=feature_paths(synth_dir), solo_select_prob=0.25)
    assert cfg.alone_select_prob == 0.25
    with pytest.raises(ValueError, match="different values"), pytest.warns(DeprecationWarning):
        TrainConfig(features=feature_paths(synth_dir), solo_select_prob=0.25, alone_select_prob=0.5)
    args = build_parser().parse_args(["train", "--solo-select-prob", "0.3"])
    assert args.alone_select_prob == 0.3
    model = SparcModel(TrainConfig(**TINY).model_config_for({"a": 8, "b": 6}), seed=0)
    batch = {"a": torch.randn(4, 8), "b": torch.randn(4, 6)}
    pick = torch.tensor([0, 1, -1, 0])
    with pytest.warns(DeprecationWarning, match="alone_select"):
        old = model(batch, solo_select=pick)
    new = model(batch, alone_select=pick)
    assert torch.equal(old.codes["a"].indices, new.codes["a"].indices) and float(old.l0_alone) == float(new.l0_alone)
