"""Batch jobs on Ray (``--engine ray``): extraction and index builds on a local Ray cluster started here equal
the local engine's output, survive a killed actor and a killed driver, and say which extra is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index import Searcher, build_bundle, read_manifest
from index.cluster import build_shards
from sparc_core import SparcConfig, SparcModel, save_checkpoint
from sparc_core.cli import main
from sparc_core.config import ClipConfig, ClusterConfig, DinoConfig, EncodersConfig, ExtractConfig
from sparc_core.encoders import tiny as tm
from sparc_core.extract import extract
from sparc_core.extras import MissingExtra

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parent.parent
N_IMAGES = 90


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs, no dashboard; the jobs below join it."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    captions = tm.write_images(d / "images", N_IMAGES)
    (d / "images" / "img_0007.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # rejected
    return {
        "dir": d, "images": d / "images", "captions": captions,
        "clip": tm.write_clip_dir(d / "clip"), "dino": tm.write_dino_official(d / "dino.pth"),
    }  # fmt: skip


def _config(s, out: Path, engine: str = "local", **cluster) -> ExtractConfig:
    dino = DinoConfig(model=tm.DINO_ARCH, weights=str(s["dino"]), model_args=tm.DINO_ARGS, image_size=tm.DINO_SIZE)
    enc = EncodersConfig(clip=ClipConfig(weights=str(s["clip"])), dino=dino, device="cpu")
    return ExtractConfig(
        images=str(s["images"]), captions=str(s["captions"]), out=str(out), encoders=enc, batch_size=4,
        chunk_size=6, workers=0, progress=False, engine=engine, cluster=ClusterConfig(**cluster),
    )  # fmt: skip


def _outputs(out: Path) -> dict[str, object]:
    files = {p.name: np.load(p) for p in sorted(out.glob("*.npy"))}
    return {"ids": (out / "ids.txt").read_text(), "rejects": (out / "rejects.jsonl").read_text(), **files}


def _assert_same(a: Path, b: Path) -> None:
    x, y = _outputs(a), _outputs(b)
    assert x.keys() == y.keys() and x["ids"] == y["ids"] and x["rejects"] == y["rejects"]
    for key in x:
        if key.endswith(".npy"):
            np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def local_run(images):
    out = images["dir"] / "local"
    extract(_config(images, out))
    return out


def test_ray_extract_equals_the_local_engine(cluster, images, local_run):
    out = images["dir"] / "ray"
    argv = ["extract", "--images", str(images["images"]), "--captions", str(images["captions"]), "--out", str(out),
            "--clip-weights", str(images["clip"]), "--dino-model", tm.DINO_ARCH, "--dino-weights", str(images["dino"]),
            "--dino-model-args", json.dumps(tm.DINO_ARGS), "--dino-image-size", str(tm.DINO_SIZE), "--device", "cpu",
            "--batch-size", "4", "--chunk-size", "6", "--workers", "0", "--quiet", "--engine", "ray",
            "--actors", "2"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "extract.json").read_text())
    assert manifest["rows"] == N_IMAGES - 1 and manifest["rejected"] == 1
    assert manifest["engine"] == {**manifest["engine"], "name": "ray", "actors": 2, "chunks_encoded": 15, "rows_encoded": 90}
    assert json.loads((out / "rejects.jsonl").read_text())["id"] == "item-7"
    _assert_same(out, local_run)
    again = extract(_config(images, out, "ray", actors=2))  # complete: nothing to do
    assert again["fingerprint"] == manifest["fingerprint"]


def _worker_pids(name: str) -> set[int]:
    """Processes whose title names a Ray actor of class ``name`` (Ray titles its workers ray::...)."""
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if name.encode() in cmd and b"ray::" in cmd:
                pids.add(int(p.name))
    return pids


def test_a_killed_actor_is_replaced_and_every_row_lands_once(cluster, images, local_run, tmp_path):
    out = tmp_path / "killed"
    result: dict[str, object] = {}
    job = threading.Thread(target=lambda: result.update(m=extract(_config(images, out, "ray", actors=2))))
    job.start()
    killed, seen = None, set()
    deadline = time.monotonic() + 120
    while job.is_alive() and time.monotonic() < deadline:
        pids = _worker_pids("ChunkWorker")
        seen |= pids
        chunks = list((out / "chunks").glob("chunk_*.safetensors"))
        if killed is None and pids and chunks:  # mid-job: some chunks written, the rest to come
            killed = min(pids)
            os.kill(killed, signal.SIGKILL)
            written_when_killed = len(chunks)
        time.sleep(0.05)
    job.join(timeout=120)
    assert killed is not None, "no actor process was found to kill"
    assert written_when_killed < 15, "the job had finished before the kill"
    assert len(seen - {killed}) >= 2, "no actor replaced the killed one"  # pool of 2: one more than before
    assert result["m"]["rows"] == N_IMAGES - 1
    _assert_same(out, local_run)  # every row exactly once, in order


def test_a_rerun_after_the_driver_is_killed_resumes_from_its_chunks(cluster, images, local_run, tmp_path):
    out = tmp_path / "resumed"
    cfg = _config(images, out, "ray", actors=1, address=cluster).model_copy(update={"keep_chunks": True})
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sparc_core.extract import extract; from sparc_core.config import "
         "ExtractConfig; extract(ExtractConfig.model_validate_json(sys.argv[1]))", cfg.model_dump_json()],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "chunks").glob("chunk_*.safetensors"))) < 3 and time.monotonic() < deadline:
            assert driver.poll() is None, "the driver ended before it was killed"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        driver.kill()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk_*.safetensors")}
    assert 3 <= len(before) < 15 and not (out / "extract.json").exists()
    manifest = extract(cfg.model_copy(update={"cluster": ClusterConfig(actors=2)}))
    assert manifest["rows"] == N_IMAGES - 1
    after = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("chunk_*.safetensors")}
    assert len(after) == 15 and all(after[n] == t for n, t in before.items())  # not encoded again
    _assert_same(out, local_run)


def test_without_ray_the_engine_names_the_extra(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'sparc\[ray\]'"):
        extract(_config(images, tmp_path / "x", "ray"))
    argv = ["extract", "--images", str(images["images"]), "--captions", str(images["captions"]), "--out",
            str(tmp_path / "y"), "--clip-weights", str(images["clip"]), "--no-dino", "--engine", "ray", "--quiet"]  # fmt: skip
    assert main(argv) != 0
    assert "sparc[ray]" in capsys.readouterr().err


# ---- index builds ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    d = tmp_path_factory.mktemp("gallery")
    model = SparcModel(SparcConfig(streams={"img": 32, "txt": 24}, n_latents=128, k=8, auxk=8), seed=1)
    ckpt = save_checkpoint(model, d / "ckpt")
    feats = d / "g.npy"
    np.save(feats, np.random.default_rng(0).standard_normal((1001, 32)).astype(np.float32))
    ids = d / "ids.txt"
    ids.write_text("".join(f"item-{i}\n" for i in range(1001)))
    build_bundle(ckpt, "img", feats, d / "single", ids=ids, batch_size=64, progress=False)
    return {"dir": d, "ckpt": ckpt, "feats": feats, "ids": ids}


def _same_top_k(single: Path, shards: list[Path]) -> None:
    xq = np.random.default_rng(5).standard_normal((40, 24)).astype(np.float32)
    for path in ("sparse", "dense"):
        a = Searcher(single).search(("txt", xq), top_k=10, path=path)
        b = Searcher(shards).search(("txt", xq), top_k=10, path=path)
        assert a.ids == b.ids, path  # identical hits, in the same order
        np.testing.assert_array_equal(np.array(a.scores), np.array(b.scores))


def test_ray_index_build_equals_the_single_build_and_a_rerun_skips_built_shards(cluster, gallery, tmp_path):
    g = gallery
    out = tmp_path / "shards"
    paths = build_shards(g["ckpt"], "img", g["feats"], out, n_shards=3, engine="ray", ids=g["ids"], batch_size=64,
                         cluster=ClusterConfig(actors=2), progress=False)  # fmt: skip
    assert paths == [out / f"shard-{i:05d}" for i in range(3)]
    assert [read_manifest(p).shard.row_start for p in paths] == [0, 334, 668]
    _same_top_k(g["dir"] / "single", paths)
    versions = {p: (p / "CURRENT").read_text() for p in paths}
    import shutil

    shutil.rmtree(paths[1])  # a shard lost (or never finished): the rerun builds it alone
    build_shards(g["ckpt"], "img", g["feats"], out, n_shards=3, engine="ray", ids=g["ids"], batch_size=64,
                 cluster=ClusterConfig(actors=2), progress=False)  # fmt: skip
    assert (paths[0] / "CURRENT").read_text() == versions[paths[0]]
    assert (paths[2] / "CURRENT").read_text() == versions[paths[2]]
    _same_top_k(g["dir"] / "single", paths)


def test_index_build_cli_on_ray_prints_the_serve_flag(cluster, gallery, tmp_path, capsys):
    g = gallery
    out = tmp_path / "cli"
    argv = ["index", "build", "--checkpoint", str(g["ckpt"]), "--stream", "img", "--features", str(g["feats"]),
            "--ids", str(g["ids"]), "--out", str(out), "--engine", "ray", "--actors", "2", "--batch-size", "64",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"--index NAME={out / 'shard-00000'},{out / 'shard-00001'}" in printed  # default: one shard per actor
    _same_top_k(g["dir"] / "single", [out / "shard-00000", out / "shard-00001"])
    assert main([*argv[:-1], "--shard", "1/2", "--quiet"]) != 0
    assert "--shard I/N builds one shard" in capsys.readouterr().err
