"""`sparc extract`: captions parsing, pairing under rejects, resume after a crash, then `sparc train` on the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sparc_core.extract as ex
from sparc_core import load_checkpoint
from sparc_core.cli import main
from sparc_core.config import ClipConfig, DinoConfig, EncodersConfig, ExtractConfig
from sparc_core.encoders import load_encoders
from sparc_core.encoders import tiny as tm
from sparc_core.extract import ExtractError, extract, read_captions

N_IMAGES = 200


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    captions = tm.write_images(d / "images", N_IMAGES)
    (d / "images" / "img_0005.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt
    (d / "images" / "img_0150.png").unlink()  # missing
    return {
        "dir": d,
        "images": d / "images",
        "captions": captions,
        "clip": tm.write_clip_dir(d / "clip"),
        "dino": tm.write_dino_official(d / "dinov2_vits14_reg4_pretrain.pth"),
    }


def _argv(s, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--images", str(s["images"]), "--captions", str(s["captions"]), "--out", str(out),
        "--clip-weights", str(s["clip"]),
        "--dino-model", tm.DINO_ARCH, "--dino-weights", str(s["dino"]),
        "--dino-model-args", json.dumps(tm.DINO_ARGS), "--dino-image-size", str(tm.DINO_SIZE),
        "--batch-size", "16", "--chunk-size", "48", "--workers", "0", "--quiet", *extra,
    ]  # fmt: skip


def _config(s, out: Path) -> ExtractConfig:
    dino = DinoConfig(model=tm.DINO_ARCH, weights=str(s["dino"]), model_args=tm.DINO_ARGS, image_size=tm.DINO_SIZE)
    enc = EncodersConfig(clip=ClipConfig(weights=str(s["clip"])), dino=dino, device="cpu")
    return ExtractConfig(
        images=str(s["images"]), captions=str(s["captions"]), out=str(out), encoders=enc,
        batch_size=16, chunk_size=48, workers=0, progress=False,
    )  # fmt: skip


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "extract.json"}


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup["dir"] / "full"
    assert main(_argv(setup, out, "--workers", "2")) == 0
    return out


def test_extract_writes_paired_streams_and_records_rejects(setup, full_run):
    out = full_run
    manifest = json.loads((out / "extract.json").read_text())
    assert manifest["rows"] == N_IMAGES - 2 and manifest["rejected"] == 2
    assert {s: v["dim"] for s, v in manifest["streams"].items()} == {"clip_img": 16, "clip_txt": 16, "dino": 32}
    ids = (out / "ids.txt").read_text().splitlines()
    assert len(ids) == N_IMAGES - 2 and "item-5" not in ids and "item-150" not in ids
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["row"]) for r in rejects] == [("item-5", 5), ("item-150", 150)]
    assert "FileNotFoundError" in rejects[1]["error"]
    feats = {s: np.load(out / f"{s}.npy") for s in ("clip_img", "clip_txt", "dino")}
    assert all(f.shape[0] == N_IMAGES - 2 and f.dtype == np.float32 for f in feats.values())
    np.testing.assert_allclose(np.linalg.norm(feats["clip_img"], axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats["clip_txt"], axis=1), 1, atol=1e-5)
    assert not (out / "chunks").exists()

    # pairing survives the rejects: every row holds the features of its own image and caption
    enc = load_encoders(_config(setup, out).encoders)
    items = {it.id: it for it in read_captions(setup["captions"])}
    for row in (0, 5, 148, 149, N_IMAGES - 3):
        item = items[ids[row]]
        image = Image.open(setup["images"] / item.image)
        torch.testing.assert_close(torch.from_numpy(feats["dino"][row]), enc["dino"].encode_images([image])[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.from_numpy(feats["clip_img"][row]), enc["clip_img"].encode_images([image])[0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            torch.from_numpy(feats["clip_txt"][row]), enc["clip_txt"].encode_texts([item.caption])[0], atol=1e-4, rtol=0
        )


def test_sparc_train_trains_on_extracted_features(full_run, tmp_path):
    out = full_run
    ckpt = tmp_path / "ckpt"
    argv = ["train", "--out", str(ckpt), "--n-latents", "64", "--k", "4", "--steps", "30", "--batch-size", "32",
            "--eval-every", "10", "--quiet", "--device", "cpu"]  # fmt: skip
    for s in ("dino", "clip_img", "clip_txt"):
        argv += ["--features", f"{s}={out / f'{s}.npy'}"]
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("val_rows: 32\nauxk: 16\n")
    assert main([*argv, "--config", str(cfg_file)]) == 0
    model = load_checkpoint(ckpt)
    assert model.cfg.streams == {"dino": 32, "clip_img": 16, "clip_txt": 16}
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["step"] == 30 and np.isfinite(metrics["val"]["mean_nmse_self"])
    code = model.encode({"clip_txt": torch.from_numpy(np.load(out / "clip_txt.npy")[:4])})
    assert code.indices.shape == (4, 4)


def test_interrupted_extraction_resumes_to_identical_files(setup, full_run, monkeypatch, tmp_path):
    out = tmp_path / "resumed"
    real, calls = ex._encode_batch, {"n": 0}

    def crash_after_seven(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 7:  # mid-way through the third chunk (3 batches of 16 per chunk of 48)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ex, "_encode_batch", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        extract(_config(setup, out))
    done = sorted(p.name for p in (out / "chunks").glob("chunk_*.safetensors"))
    assert done == ["chunk_000000.safetensors", "chunk_000001.safetensors"]
    assert not (out / "extract.json").exists() and not (out / "dino.npy").exists()
    (out / "chunks" / ".chunk_000002.safetensors.x.tmp").write_bytes(b"torn write")  # a kill during a write
    (out / "chunks" / "chunk_000003.safetensors").write_bytes(b"torn")  # or a corrupt chunk

    monkeypatch.setattr(ex, "_encode_batch", real)
    encoded = []
    monkeypatch.setattr(ex, "_encode_batch", lambda *a, **kw: encoded.append(len(a[1])) or real(*a, **kw))
    manifest = extract(_config(setup, out))
    assert sum(encoded) == N_IMAGES - 2 * 48 - 1  # chunks 0-1 not redone; item 150 (missing) is never encoded
    assert manifest["rows"] == N_IMAGES - 2
    assert _files(out) == _files(full_run)  # byte-identical to the uninterrupted run

    encoded.clear()
    assert extract(_config(setup, out))["fingerprint"] == manifest["fingerprint"]  # complete: nothing to do
    assert encoded == []


def test_resume_with_other_settings_is_refused(setup, full_run, tmp_path):
    with pytest.raises(ExtractError, match="already holds features extracted with other inputs"):
        extract(_config(setup, full_run).model_copy(update={"batch_size": 8}))
    out = tmp_path / "partial"
    (out / "chunks").mkdir(parents=True)
    (out / "chunks" / "fingerprint.json").write_text(json.dumps({"hash": "something else"}))
    with pytest.raises(ExtractError, match="partial extraction with other inputs"):
        extract(_config(setup, out))


def test_caption_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"image": "x.jpg", "text": "one"}\n\n{"image_path": "y.jpg", "caption": "two", "id": 7}\n')
    assert [(i.image, i.caption, i.id) for i in read_captions(tmp_path / "a.jsonl")] == [
        ("x.jpg", "one", "x.jpg"),
        ("y.jpg", "two", "7"),
    ]
    coco = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "a cat "},
            {"id": 12, "image_id": 1, "caption": "the cat"},
            {"id": 21, "image_id": 2, "caption": "a dog"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert [(i.image, i.caption, i.id) for i in read_captions(tmp_path / "coco.json")] == [
        ("1.jpg", "a cat", "1"),
        ("2.jpg", "a dog", "2"),
    ]
    assert [i.id for i in read_captions(tmp_path / "coco.json", all_captions=True)] == ["11", "12", "21"]
    (tmp_path / "many.csv").write_text("image_path,caption\nx.jpg,one\nx.jpg,two\n")
    assert [i.id for i in read_captions(tmp_path / "many.csv")] == ["x.jpg"]
    assert [i.id for i in read_captions(tmp_path / "many.csv", all_captions=True)] == ["x.jpg#0", "x.jpg#1"]


@pytest.mark.parametrize(
    "name, text, error",
    [
        ("c.csv", "file,caption\nx.jpg,one\n", r"c.csv:2: no image path"),
        ("c.csv", "image_path,caption\nx.jpg,\n", r"c.csv:2: empty caption for x.jpg"),
        ("c.csv", "image_path,caption,id\nx.jpg,a,1\ny.jpg,b,1\n", r"id '1' appears twice"),
        ("c.csv", "image_path,caption\n", r"no rows"),
        ("c.jsonl", '{"image": "x.jpg", "caption": "a"}\n{oops\n', r"c.jsonl:2: not valid JSON"),
        ("c.json", '{"images": []}', r"not a COCO captions file"),
        ("c.txt", "x.jpg a cat", r"unsupported caption file"),
    ],
)
def test_bad_caption_files_name_the_problem(tmp_path, name, text, error):
    (tmp_path / name).write_text(text)
    with pytest.raises(ExtractError, match=error):
        read_captions(tmp_path / name)


def test_cli_errors_are_one_line(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPARC_CLIP_WEIGHTS", raising=False)
    argv = ["extract", "--images", str(setup["images"]), "--captions", str(setup["captions"]), "--out", str(tmp_path / "o")]
    assert main([*argv, "--no-dino"]) == 2
    assert "no CLIP weights configured" in capsys.readouterr().err
    assert main([*argv, "--no-dino", "--no-clip"]) == 2
    assert "at least one encoder" in capsys.readouterr().err


def test_all_captions_rows_share_one_image_encoding(setup, tmp_path, monkeypatch):
    coco = {
        "images": [{"id": i, "file_name": f"img_{i:04d}.{'png' if i % 3 == 0 else 'jpg'}"} for i in range(6, 12)],
        "annotations": [
            {"id": 10 * i + j, "image_id": i, "caption": f"caption {j} of image {i}"} for i in range(6, 12) for j in range(3)
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    cfg = _config(setup, tmp_path / "out").model_copy(
        update={"captions": str(tmp_path / "coco.json"), "all_captions": True, "batch_size": 9}
    )
    enc = load_encoders(cfg.encoders)
    seen = []
    real = enc["dino"].encode_pixels
    monkeypatch.setattr(enc["dino"], "encode_pixels", lambda px: seen.append(len(px)) or real(px))
    manifest = extract(cfg, encoders=enc)
    assert manifest["rows"] == 18 and seen == [3, 3]  # 2 batches of 9 rows = 3 images x 3 captions, each image once
    ids = (tmp_path / "out" / "ids.txt").read_text().split()
    assert ids == [str(10 * i + j) for i in range(6, 12) for j in range(3)]
    dino, txt = np.load(tmp_path / "out" / "dino.npy"), np.load(tmp_path / "out" / "clip_txt.npy")
    monkeypatch.undo()
    for r in (0, 4, 17):
        image = Image.open(setup["images"] / coco["images"][r // 3]["file_name"])
        np.testing.assert_allclose(dino[r], enc["dino"].encode_images([image])[0].numpy(), atol=1e-4)
    assert np.array_equal(dino[0], dino[2]) and not np.allclose(txt[0], txt[1])


def test_extract_config_file_with_flag_overrides(setup, full_run, tmp_path, capsys):
    dino = {"model": tm.DINO_ARCH, "weights": str(setup["dino"]), "model_args": tm.DINO_ARGS, "image_size": tm.DINO_SIZE}
    cfg = {
        "images": str(setup["images"]), "captions": str(setup["captions"]), "out": str(tmp_path / "ignored"),
        "encoders": {"clip": {"weights": str(setup["clip"])}, "dino": dino},
        "batch_size": 16, "chunk_size": 48, "workers": 0, "progress": False,
    }  # fmt: skip
    (tmp_path / "extract.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["extract", "--config", str(tmp_path / "extract.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert _files(tmp_path / "out") == _files(full_run)  # same settings as the flag-driven run, same bytes
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "batchsize": 3}))
    assert main(["extract", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "batchsize: unknown key" in capsys.readouterr().err
