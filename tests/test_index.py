"""Index bundles: build/search correctness against brute force, atomic rebuilds, errors, shards, explanations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from index import Bundle, BundleError, Searcher, append_to_bundle, build_bundle, read_manifest
from index.faiss_backend import gpu_available, gpu_count
from sparc_core import SparcConfig, SparcModel, checkpoint_hash, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    model = SparcModel(SparcConfig(streams={"img": 32, "txt": 24}, n_latents=128, k=8, auxk=8), seed=1)
    return save_checkpoint(model, tmp_path_factory.mktemp("rand") / "ckpt")


def _feats(tmp_path: Path, n: int, d: int, seed: int = 0, name: str = "g.npy") -> Path:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    np.save(tmp_path / name, x)
    return tmp_path / name


def test_cross_stream_search_finds_the_paired_item(trained_checkpoint, medium_synth, tmp_path):
    out = build_bundle(trained_checkpoint, "dino", medium_synth / "eval" / "dino.npy", tmp_path / "b", progress=False)
    assert out.parent == tmp_path / "b"
    searcher = Searcher(tmp_path / "b")
    # the bundle holds the checkpoint's search code (agreed latents plus the rest at the calibrated weight)
    assert searcher.manifest.code == "search" and searcher.manifest.soft_weight == searcher.model.soft_weight
    xq = np.load(medium_synth / "eval" / "clip_txt.npy")
    n = len(xq)
    idx, val = searcher.shards[0].codes(np.arange(5))
    expect = searcher.model.encode({"dino": torch.from_numpy(np.load(medium_synth / "eval" / "dino.npy")[:5])})
    assert np.array_equal(np.sort(idx, 1), np.sort(expect.indices.numpy(), 1))
    for path in ("sparse", "dense"):
        res = searcher.search(("clip_txt", xq), top_k=10, path=path)
        top1 = np.mean([ids[0] == i for i, ids in enumerate(res.ids)])
        top10 = np.mean([i in ids for i, ids in enumerate(res.ids)])
        assert top1 > 0.3, (path, top1)  # text query -> its own image, 600 items, chance is 0.0017
        assert top10 > 0.7, (path, top10)
        assert all(len(ids) == 10 for ids in res.ids) and len(res.ids) == n


def test_both_paths_match_numpy_brute_force(random_ckpt, tmp_path):
    from sparc_core import load_checkpoint

    feats = _feats(tmp_path, 500, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    model = load_checkpoint(random_ckpt)
    searcher = Searcher(tmp_path / "b")
    xq = np.random.default_rng(5).standard_normal((20, 24)).astype(np.float32)
    code = searcher.encode("txt", xq)
    # sparse: cosine between codes (values stored in float16)
    gal = model.encode({"img": torch.from_numpy(np.load(feats))})
    g_dense = torch.nn.functional.normalize(gal.values, dim=1).half().float()
    G = torch.zeros(500, 128).scatter(1, gal.indices, g_dense).numpy()
    Q = torch.nn.functional.normalize(code.to_dense(), dim=1).numpy()
    expected = Q @ G.T
    res = searcher.search(code, top_k=5, path="sparse")
    for q in range(20):
        # hits are the items sharing an active latent (score > 0): as many as exist, up to top_k
        assert len(res.scores[q]) == min(5, int((expected[q] > 1e-6).sum())) > 0
        np.testing.assert_allclose(res.scores[q], np.sort(expected[q])[::-1][: len(res.scores[q])], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(expected[q][res.ids[q]], res.scores[q], rtol=1e-3, atol=1e-4)
    # dense: inner product of the cross-decoded query with the centred unit gallery features
    c = model.codecs["img"]
    xb = torch.nn.functional.normalize(model.normalize("img", torch.from_numpy(np.load(feats))) - c.b_dec, dim=1)
    xqd = torch.nn.functional.normalize(model.decode(code, "img", "normalized") - c.b_dec, dim=1)
    exp_d = (xqd @ xb.T).detach().numpy()
    res = searcher.search(code, top_k=5, path="dense")
    for q in range(20):
        assert len(res.scores[q]) == 5
        np.testing.assert_allclose(res.scores[q], np.sort(exp_d[q])[::-1][:5], rtol=1e-4, atol=1e-5)


def test_ids_are_preserved_and_validated(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 50, 32)
    ids = np.array([f"img-{i:03d}" for i in range(50)])
    np.save(tmp_path / "ids.npy", ids)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", ids=tmp_path / "ids.npy", progress=False)
    s = Searcher(tmp_path / "b")
    res = s.search(("img", np.load(feats)[:5]), top_k=3, path="dense")
    assert [ids[0] for ids in res.ids] == [f"img-{i:03d}" for i in range(5)]  # an item finds itself first
    dup = ids.copy()
    dup[7] = dup[3]
    np.save(tmp_path / "dup.npy", dup)
    with pytest.raises(BundleError, match="duplicate item ids, e.g. \\['img-003'\\]"):
        build_bundle(random_ckpt, "img", feats, tmp_path / "c", ids=tmp_path / "dup.npy", progress=False)
    with pytest.raises(BundleError, match="dim 32, but stream 'txt' of the checkpoint expects 24"):
        build_bundle(random_ckpt, "txt", feats, tmp_path / "c", progress=False)
    with pytest.raises(BundleError, match="stream 'audio' is not in checkpoint"):
        build_bundle(random_ckpt, "audio", feats, tmp_path / "c", progress=False)
    np.save(tmp_path / "empty.npy", np.zeros((0, 32), dtype=np.float32))
    with pytest.raises(BundleError, match="holds no rows"):
        build_bundle(random_ckpt, "img", tmp_path / "empty.npy", tmp_path / "c", progress=False)


def test_corrupt_manifest_truncated_file_and_wrong_checkpoint(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 40, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    vdir = Bundle(tmp_path / "b").vdir
    manifest = vdir / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[:-20])
    with pytest.raises(BundleError, match="manifest.json: corrupt JSON"):
        Bundle(tmp_path / "b")
    manifest.write_text(good)
    post = vdir / "part-00000" / "post_items.bin"
    data = post.read_bytes()
    post.write_bytes(data[:-8])
    with pytest.raises(BundleError, match="post_items.bin: .* bytes, manifest says .* \\(truncated or corrupt\\)"):
        Bundle(tmp_path / "b")
    post.write_bytes(data)
    dense = vdir / "part-00000" / "dense.faiss"
    dense_bytes = dense.read_bytes()
    other = SparcModel(SparcConfig(streams={"img": 32, "txt": 24}, n_latents=128, k=8, auxk=8), seed=99)
    other_ckpt = save_checkpoint(other, tmp_path / "other")
    with pytest.raises(BundleError, match="is not the checkpoint the index was built with"):
        Searcher(tmp_path / "b", checkpoint=other_ckpt)
    with pytest.raises(BundleError, match="built with checkpoint .* rebuild the index"):
        Bundle(tmp_path / "b", expected_checkpoint="0" * 64)
    assert Bundle(tmp_path / "b").parts[0].dense_index.ntotal == 40 and dense.read_bytes() == dense_bytes
    (tmp_path / "b" / "CURRENT").write_text("v-nope\n")
    with pytest.raises(BundleError, match="names version 'v-nope', which does not exist"):
        Bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="index bundle not found"):
        Bundle(tmp_path / "missing")


def test_hostile_part_names_and_posting_offsets_are_refused_on_load(random_ckpt, tmp_path):
    # The compiled kernels trust the offsets, and a part name is joined to the version directory: a
    # manifest naming "../x" or offsets that go backwards must fail to load, never read out of bounds.
    import json

    feats = _feats(tmp_path, 40, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    vdir = Bundle(tmp_path / "b").vdir
    manifest = vdir / "manifest.json"
    good = json.loads(manifest.read_text())
    for name in ("../x", "/etc", "part-00000/../../x"):
        manifest.write_text(json.dumps(good | {"parts": [good["parts"][0] | {"name": name}]}))
        with pytest.raises(BundleError, match="invalid manifest .*parts.0.name"):
            Bundle(tmp_path / "b")
    manifest.write_text(json.dumps(good))
    off_file = vdir / "part-00000" / "post_offsets.npy"
    offsets = np.load(off_file)
    bad = offsets.copy()
    j = int(np.flatnonzero(np.diff(bad) > 0)[0]) + 1
    bad[j], bad[j + 1] = bad[j + 1], bad[j] - 1  # one list runs backwards, same file size
    np.save(off_file, bad)
    with pytest.raises(BundleError, match="post_offsets.npy: content checksum"):  # changed after its build
        Bundle(tmp_path / "b")
    from index.validate import checksum

    manifest.write_text(json.dumps(good | {"checksums": good["checksums"] | {"part-00000/post_offsets.npy": checksum(off_file)}}))
    with pytest.raises(BundleError, match="posting offsets must start at 0 and never decrease"):  # a wrong writer
        Bundle(tmp_path / "b")
    manifest.write_text(json.dumps(good))
    np.save(off_file, offsets)
    assert Bundle(tmp_path / "b").manifest.n_items == 40


KILL_SCRIPT = """
import sys, time
import index.bundle as b
real = b.atomic_save_npy
def slow(path, arr):
    real(path, arr)
    print("WRITING", flush=True)
    time.sleep(60)
b.atomic_save_npy = slow
b.build_bundle(sys.argv[1], "img", sys.argv[2], sys.argv[3], progress=False)
"""


def test_killed_build_leaves_previous_bundle_loadable(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 60, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    before = Searcher(tmp_path / "b").search(("img", np.load(feats)[:4]), top_k=3)
    new_feats = _feats(tmp_path, 90, 32, seed=1, name="new.npy")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(random_ckpt), str(new_feats), str(tmp_path / "b")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert read_manifest(tmp_path / "b").n_items == 60
    after = Searcher(tmp_path / "b").search(("img", np.load(feats)[:4]), top_k=3)
    assert after.ids == before.ids and after.scores == before.scores
    # The next build cleans the half-written version away and succeeds.
    build_bundle(random_ckpt, "img", new_feats, tmp_path / "b", progress=False)
    assert read_manifest(tmp_path / "b").n_items == 90
    assert not list((tmp_path / "b").glob(".building-*"))
    assert len(list((tmp_path / "b").glob("v-*"))) == 1


def test_shard_merge_equals_unsharded(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 301, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "all", progress=False)
    shards = []
    for i in range(3):
        build_bundle(random_ckpt, "img", feats, tmp_path / f"s{i}", shard=(i, 3), progress=False)
        shards.append(tmp_path / f"s{i}")
    assert [read_manifest(s).shard.row_start for s in shards] == [0, 101, 202]
    xq = np.random.default_rng(3).standard_normal((15, 24)).astype(np.float32)
    whole, split = Searcher(tmp_path / "all"), Searcher(shards)
    assert split.n_items == 301
    for path in ("sparse", "dense"):
        a = whole.search(("txt", xq), top_k=7, path=path)
        b = split.search(("txt", xq), top_k=7, path=path)
        np.testing.assert_allclose(np.array(a.scores), np.array(b.scores), rtol=1e-6)
        for ia, ib, sa in zip(a.ids, b.ids, a.scores):
            distinct = len(set(np.round(sa, 5))) == len(sa)
            if distinct:  # with ties the order among equal scores may differ
                assert ia == ib


def test_explanations_add_up_to_the_sparse_score(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 100, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    s = Searcher(tmp_path / "b")
    code = s.encode("txt", np.random.default_rng(1).standard_normal((3, 24)).astype(np.float32))
    res = s.search(code, top_k=4, path="sparse")
    for q in range(3):
        assert len(res.ids[q]) == 4
        for item, score in zip(res.ids[q], res.scores[q]):
            parts = s.explain(code, item, top=100, row=q)
            assert parts and sum(p.contribution for p in parts) == pytest.approx(score, rel=1e-3, abs=1e-4)
            assert [p.contribution for p in parts] == sorted((p.contribution for p in parts), reverse=True)
            assert all(p.latent in code.indices[q].tolist() for p in parts)


def test_latent_filters(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 200, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    s = Searcher(tmp_path / "b")
    code = s.encode("txt", np.random.default_rng(2).standard_normal((2, 24)).astype(np.float32))
    target = int(code.indices[0][code.values[0].argmax()])
    having = sum(target in s.item_code(i)[0][s.item_code(i)[1] > 0].tolist() for i in range(200))
    assert 5 <= having <= 195  # the filter has items to keep and items to drop
    for path in ("sparse", "dense"):
        req = s.search(code, top_k=5, path=path, require=[target])
        exc = s.search(code, top_k=5, path=path, exclude=[target])
        assert len(req.ids[0]) == 5 and len(exc.ids[0]) == 5
        for item in req.ids[0]:
            idx, val = s.item_code(item)
            assert target in idx[val > 0].tolist()
        for item in exc.ids[0]:
            idx, val = s.item_code(item)
            assert target not in idx[val > 0].tolist()
    boosted = s.search(code, top_k=5, path="sparse", boost={target: 10.0})
    assert len(boosted.ids[0]) == 5
    for item in boosted.ids[0]:
        idx, val = s.item_code(item)
        assert target in idx[val > 0].tolist()
    with pytest.raises(ValueError, match="latent 999 is out of range"):
        s.search(code, require=[999])


def test_add_appends_and_keeps_ids_unique(random_ckpt, tmp_path):
    build_bundle(random_ckpt, "img", _feats(tmp_path, 30, 32), tmp_path / "b", progress=False)
    extra = _feats(tmp_path, 10, 32, seed=4, name="extra.npy")
    append_to_bundle(tmp_path / "b", extra, progress=False)
    m = read_manifest(tmp_path / "b")
    assert m.n_items == 40
    s = Searcher(tmp_path / "b")
    res = s.search(("img", np.load(extra)), top_k=1, path="dense")
    assert [r[0] for r in res.ids] == list(range(30, 40))
    np.save(tmp_path / "clash.npy", np.arange(5, 15))
    with pytest.raises(BundleError, match="duplicate item ids"):
        append_to_bundle(tmp_path / "b", extra, ids=tmp_path / "clash.npy", progress=False)


def test_approximate_factory_and_per_call_nprobe(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 2000, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "ivf", faiss_factory="IVF16,Flat", progress=False)
    s = Searcher(tmp_path / "ivf")
    xq = np.load(feats)[:50]
    exact = s.search(("img", xq), top_k=1, path="dense", nprobe=16)
    assert np.mean([ids[0] == i for i, ids in enumerate(exact.ids)]) == 1.0
    s.search(("img", xq), top_k=1, path="dense", nprobe=1)
    from index.faiss_backend import DenseIndexError

    assert faiss_nprobe(s) == 1  # the shared index was not mutated by the per-call nprobe
    with pytest.raises(DenseIndexError, match="invalid FAISS factory string 'IVFxx'"):
        build_bundle(random_ckpt, "img", feats, tmp_path / "bad", faiss_factory="IVFxx", progress=False)


def faiss_nprobe(searcher: Searcher) -> int:
    import faiss

    return faiss.extract_index_ivf(searcher.dense[0][0].index).nprobe


def test_cli_build_info_search(random_ckpt, tmp_path, capsys):
    from sparc_core.cli import main

    feats = _feats(tmp_path, 40, 32)
    assert (
        main(
            [
                "index",
                "build",
                "--checkpoint",
                str(random_ckpt),
                "--stream",
                "img",
                "--features",
                str(feats),
                "--out",
                str(tmp_path / "b"),
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["index", "info", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{") :])
    assert info["n_items"] == 40 and info["stream"] == "img"
    assert main(["index", "info", "--bundle", str(tmp_path / "b")]) == 0  # the flag every other index command takes
    assert json.loads(capsys.readouterr().out)["n_items"] == 40
    assert main(["index", "info"]) == 2 and "give one bundle" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", np.load(feats)[:2])
    assert (
        main(
            [
                "index",
                "search",
                "--bundle",
                str(tmp_path / "b"),
                "--stream",
                "img",
                "--queries",
                str(tmp_path / "q.npy"),
                "--top-k",
                "2",
                "--explain",
            ]
        )
        == 0
    )
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert lines[0]["hits"][0]["id"] == 0 and lines[1]["hits"][0]["id"] == 1
    assert main(["index", "info", str(tmp_path / "nope")]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a CUDA device")
def test_gpu_dense_search_matches_cpu(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 500, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    xq = np.load(feats)[:20]
    cpu = Searcher(tmp_path / "b", use_gpu=False).search(("img", xq), top_k=5, path="dense")
    gpu = Searcher(tmp_path / "b", use_gpu=True).search(("img", xq), top_k=5, path="dense")
    assert gpu.ids == cpu.ids
    np.testing.assert_allclose(gpu.scores, cpu.scores, rtol=1e-4)


def test_faiss_gpus_setting_parses_and_refuses_what_faiss_cannot_see(monkeypatch):
    import index.faiss_backend as fb

    assert fb.parse_gpus("none") == [] and fb.parse_gpus(None, device="cpu") == []
    monkeypatch.setattr(fb, "gpu_count", lambda: 2)
    assert fb.parse_gpus("all") == [0, 1] and fb.parse_gpus(None, device="cuda") == [0, 1] and fb.parse_gpus(" 1 ") == [1]
    with pytest.raises(fb.DenseIndexError, match="GPU 2 is not available to faiss; it sees 2"):
        fb.parse_gpus("0,2")
    for bad in ("gpu0", "0,0", "-1", ","):
        with pytest.raises(fb.DenseIndexError, match="faiss_gpus"):
            fb.parse_gpus(bad)
    monkeypatch.setattr(fb, "gpu_count", lambda: 0)
    assert fb.parse_gpus("all") == []
    with pytest.raises(fb.DenseIndexError, match=r"install sparc\[gpu\]"):
        fb.parse_gpus("0")


def test_an_index_faiss_cannot_place_on_a_gpu_stays_on_the_cpu(random_ckpt, tmp_path, monkeypatch, caplog):
    import faiss

    import index.faiss_backend as fb

    feats = _feats(tmp_path, 300, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False, faiss_factory="HNSW16")
    xq = np.load(feats)[:10]
    cpu = Searcher(tmp_path / "b", gpus=[]).search(("img", xq), top_k=5, path="dense")

    def refuse(*a, **kw):
        raise RuntimeError("Error: this index type is not implemented on the GPU")

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", refuse, raising=False)
    caplog.set_level("WARNING", logger="sparc.index")
    s = Searcher(tmp_path / "b", gpus=[0])
    assert not any(d.on_gpu for ds in s.dense for d in ds)  # fell back to the CPU, with a log line
    assert "cannot run on GPU(s) [0]" in caplog.text and "IndexHNSW" in caplog.text
    got = s.search(("img", xq), top_k=5, path="dense")
    assert got.ids == cpu.ids
    fb.DenseSearcher._resources.clear()


def test_without_faiss_the_dense_path_says_what_to_install(random_ckpt, tmp_path, monkeypatch):
    import sys

    import index.faiss_backend as fb

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if neither faiss-cpu nor faiss-gpu were installed
    monkeypatch.setattr(fb, "faiss", fb._lazy_faiss())
    with pytest.raises(fb.DenseIndexError, match=r"pip install 'sparc\[cpu\]'"):
        build_bundle(random_ckpt, "img", _feats(tmp_path, 50, 32), tmp_path / "b", progress=False, dense=True)
    build_bundle(random_ckpt, "img", _feats(tmp_path, 50, 32), tmp_path / "c", progress=False)  # default: sparse only
    assert not read_manifest(tmp_path / "c").dense
    assert Searcher(tmp_path / "c").search(("img", np.load(tmp_path / "g.npy")[:2]), top_k=3).ids  # sparse works


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() < 2, reason="needs faiss-gpu and two CUDA devices")
@pytest.mark.parametrize("shard", [False, True])
def test_dense_indexes_over_several_gpus_match_cpu(random_ckpt, tmp_path, shard):
    feats = _feats(tmp_path, 2000, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    xq = np.load(feats)[:50]
    cpu = Searcher(tmp_path / "b", gpus=[]).search(("img", xq), top_k=5, path="dense")
    s = Searcher(tmp_path / "b", gpus=[0, 1], shard_gpus=shard)
    assert all(d.on_gpu and d.gpus == [0, 1] for ds in s.dense for d in ds)
    gpu = s.search(("img", xq), top_k=5, path="dense")
    assert gpu.ids == cpu.ids
    np.testing.assert_allclose(gpu.scores, cpu.scores, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a CUDA device")
def test_a_cpu_service_keeps_faiss_off_the_gpu(random_ckpt, tmp_path):
    from service.settings import load_settings

    build_bundle(random_ckpt, "img", _feats(tmp_path, 300, 32), tmp_path / "b", progress=False)
    from service.engine import Engine

    base = {"checkpoint": str(random_ckpt), "indexes": {"g": [str(tmp_path / "b")]}, "port": 0, "metrics_port": 0}
    on_cpu = Engine(load_settings(overrides=base | {"device": "cpu"}, environ={}))
    assert not any(d.on_gpu for ds in on_cpu.searchers["g"].dense for d in ds)
    on_gpu = Engine(load_settings(overrides=base | {"device": "cpu", "faiss_gpus": "0"}, environ={}))
    assert all(d.on_gpu for ds in on_gpu.searchers["g"].dense for d in ds)
    on_cpu.close()
    on_gpu.close()


def test_sparse_filters_equal_brute_force_over_shards(random_ckpt, tmp_path):
    """require/exclude inside the posting-list search: exactly the filtered brute-force top-k, on two shards."""
    from index import SearchStopped

    feats = _feats(tmp_path, 550, 32, seed=1)
    for i in range(2):
        build_bundle(random_ckpt, "img", feats, tmp_path / f"s{i}", shard=(i, 2), progress=False)
    s = Searcher([tmp_path / "s0", tmp_path / "s1"])
    code = s.encode("txt", np.random.default_rng(3).standard_normal((12, 24)).astype(np.float32))
    codes = [s.item_code(i) for i in range(550)]
    G = np.zeros((550, 128), dtype=np.float32)
    for i, (idx, val) in enumerate(codes):
        G[i, idx] = val
    Q = torch.nn.functional.normalize(code.to_dense(), dim=1).numpy()
    counts = (G > 0).sum(0)
    common = [int(j) for j in np.argsort(-counts)[:3]]  # frequent latents: filters that keep and drop many
    for require, exclude in (([common[0]], []), ([], [common[1]]), ([common[0], common[2]], [common[1]])):
        res = s.search(code, top_k=7, path="sparse", require=require, exclude=exclude)
        ok = np.all(G[:, require] > 0, axis=1) & ~np.any(G[:, exclude] > 0, axis=1)
        for q in range(12):
            expected = np.where(ok, Q[q] @ G.T, 0.0)
            n_hits = min(7, int((expected > 1e-6).sum()))
            assert len(res.ids[q]) == n_hits
            np.testing.assert_allclose(res.scores[q], np.sort(expected)[::-1][:n_hits], rtol=1e-3, atol=1e-4)
            assert all(ok[int(i)] for i in res.ids[q])
    # a rare required latent: only its few items can come back
    rare = int(np.flatnonzero(counts == counts[counts > 0].min())[0])
    res = s.search(code, top_k=50, path="sparse", require=[rare])
    assert all(G[int(i), rare] > 0 for row in res.ids for i in row)
    # a caller that asks to stop gets SearchStopped, not results
    calls = []

    def stop_after_first():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(SearchStopped):
        s.search(code, top_k=5, path="sparse", should_stop=stop_after_first)


def test_a_moved_project_keeps_its_bundles_and_search_takes_a_checkpoint(random_ckpt, tmp_path, capsys):
    import shutil

    from sparc_core.cli import main

    proj = tmp_path / "proj"
    shutil.copytree(random_ckpt, proj / "ckpt")
    build_bundle(proj / "ckpt", "img", _feats(tmp_path, 40, 32), proj / "b", progress=False)
    assert not Path(read_manifest(proj / "b").checkpoint_path).is_absolute()
    moved = tmp_path / "moved"
    proj.rename(moved)
    xq = np.random.default_rng(1).standard_normal((3, 24)).astype(np.float32)
    assert len(Searcher(moved / "b").search(("txt", xq), top_k=3).ids) == 3  # found relative to the bundle
    np.save(tmp_path / "q.npy", xq)
    (moved / "ckpt").rename(tmp_path / "elsewhere")
    argv = ["index", "search", "--bundle", str(moved / "b"), "--stream", "txt", "--queries", str(tmp_path / "q.npy")]
    assert main(argv) == 2  # the recorded checkpoint is gone: one clear line
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert main(argv + ["--checkpoint", str(tmp_path / "elsewhere")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.parametrize(
    "queries, stream, message",
    [
        (np.full((2, 24), np.nan, dtype=np.float32), "txt", "query row 0 contains NaN or inf"),
        (np.zeros((2, 24), dtype=np.float32), "nope", "unknown query stream 'nope'"),
        (np.ones((2, 5), dtype=np.float32), "txt", r"takes \[n, 24\] vectors, got shape \[2, 5\]"),
    ],
)
def test_index_search_cli_errors_are_one_line(random_ckpt, tmp_path, capsys, queries, stream, message):
    import re

    from sparc_core.cli import main

    build_bundle(random_ckpt, "img", _feats(tmp_path, 30, 32), tmp_path / "b", progress=False)
    np.save(tmp_path / "q.npy", queries)
    argv = ["index", "search", "--bundle", str(tmp_path / "b"), "--stream", stream, "--queries", str(tmp_path / "q.npy")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_add_with_the_wrong_id_kind_says_what_to_do_and_stale_builds_are_cleaned(random_ckpt, tmp_path):
    build_bundle(random_ckpt, "img", _feats(tmp_path, 30, 32), tmp_path / "b", progress=False)
    (tmp_path / "more.txt").write_text("\n".join(f"img-{i}" for i in range(10)) + "\n")
    with pytest.raises(BundleError, match="omit --ids to number the new items from 30"):
        append_to_bundle(tmp_path / "b", _feats(tmp_path, 10, 32, name="m.npy"), ids=tmp_path / "more.txt", progress=False)
    # a killed build's temp folder (its process is gone) is removed by the next build or add
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "b" / f".building-{dead.pid}-v-x"
    stale.mkdir()
    (stale / "codes_idx.npy").write_bytes(b"0" * 1000)
    append_to_bundle(tmp_path / "b", _feats(tmp_path, 10, 32, name="m.npy"), progress=False)
    assert not stale.exists()
    assert read_manifest(tmp_path / "b").n_items == 40


def test_seismic_path_candidates_rescored_exactly(random_ckpt, tmp_path):
    pytest.importorskip("seismic")
    from index.seismic_backend import ApproxSettings

    feats = _feats(tmp_path, 3000, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False, dense=False)
    s = Searcher(tmp_path / "b")
    xq = np.random.default_rng(5).standard_normal((30, 32)).astype(np.float32)
    with pytest.raises(BundleError, match="has no Seismic index"):
        s.search(("img", xq), top_k=10, path="seismic")
    from index.bundle import add_approx_index

    add_approx_index(tmp_path / "b", ApproxSettings(heap_factor=1.0))
    s = Searcher(tmp_path / "b")
    exact = s.search(("img", xq), top_k=10)
    approx = s.search(("img", xq), top_k=10, path="seismic")
    assert approx.path == "seismic"
    recall = np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx.ids, exact.ids)])
    assert recall >= 0.9
    code = s.encode("img", xq)
    for q in range(len(xq)):  # scores are exact (rescored from the stored codes), best first
        for item, score in zip(approx.ids[q], approx.scores[q]):
            assert abs(sum(e.contribution for e in s.explain(code, item, top=64, row=q)) - score) < 1e-4
        assert approx.scores[q] == sorted(approx.scores[q], reverse=True)
    cut = s.search(("img", xq), top_k=10, path="seismic", query_cut=2, heap_factor=0.5)
    assert np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(cut.ids, exact.ids)]) < recall  # per call, coarser
    filtered = s.search(("img", xq[:1]), top_k=5, path="seismic", require=[int(code.indices[0, 0])])
    assert filtered.ids == s.search(("img", xq[:1]), top_k=5, require=[int(code.indices[0, 0])]).ids  # filters: exact
    extra = _feats(tmp_path, 100, 32, seed=9, name="extra.npy")
    append_to_bundle(tmp_path / "b", extra, progress=False)
    grown = Searcher(tmp_path / "b")
    assert grown.has_seismic and len(grown.shards[0].parts) == 2
    assert grown.search(("img", np.load(extra)[:3]), top_k=1, path="seismic").ids == [[3000], [3001], [3002]]


def test_search_kernel_matches_brute_force_with_filters_and_blocks(tmp_path):
    """Several blocks (small BLOCK-crossing gallery), ties, filters: the kernel equals numpy brute force."""
    import index.postings as postings

    rng = np.random.default_rng(3)
    n, k, L = 140_000, 6, 64  # > 2 blocks of 65,536 rows
    idx = np.stack([rng.choice(L, k, replace=False) for _ in range(2000)])[rng.integers(0, 2000, n)]
    val = np.round(rng.random((n, k)) * 4) / 4  # coarse values: many exact ties
    val[rng.random((n, k)) < 0.2] = 0
    val = val.astype(np.float16)
    P = postings.Postings.from_codes(idx, val, L)
    G = np.zeros((n, L), dtype=np.float32)
    np.put_along_axis(G, idx.astype(np.int64), val.astype(np.float32), 1)
    qi = rng.integers(0, L, (12, 5))
    qv = rng.random((12, 5)).astype(np.float32)
    Q = np.zeros((12, L), dtype=np.float32)
    for q in range(12):
        np.add.at(Q[q], qi[q], qv[q])
    for require, exclude in [(None, None), ([int(qi[0, 0])], None), (None, [int(qi[0, 1]), 7])]:
        S = Q @ G.T
        ok = np.ones(n, dtype=bool)
        if require:
            ok &= (G[:, require] > 0).all(1)
        if exclude:
            ok &= ~(G[:, exclude] > 0).any(1)
        for threads in (1, 2):
            D, I = P.search(qi, qv, 10, threads=threads, require=require, exclude=exclude)
            for q in range(12):
                s = np.where(ok & (S[q] > 0), S[q], -np.inf)
                order = np.lexsort((np.arange(n), -s))[:10]  # ties: the lower row first
                want = order[s[order] > -np.inf]
                np.testing.assert_array_equal(I[q, : len(want)], want)
                np.testing.assert_allclose(D[q, : len(want)], s[want], rtol=1e-5)
                assert (I[q, len(want) :] == -1).all()
    monkey = postings.PIECE_POSTINGS
    postings.PIECE_POSTINGS = 1000  # heavy queries split over block ranges and merged
    try:
        D2, I2 = P.search(qi, qv, 10, threads=2)
    finally:
        postings.PIECE_POSTINGS = monkey
    D1, I1 = P.search(qi, qv, 10, threads=1)
    np.testing.assert_array_equal(I1, I2)


def _sparse_world(n=140_000, k=6, L=2000, seed=4):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(L, k, replace=False) for _ in range(3000)])[rng.integers(0, 3000, n)]
    val = (np.round(rng.random((n, k)) * 8) / 8 + 0.125).astype(np.float16)  # coarse: ties
    val[rng.random((n, k)) < 0.2] = 0
    return idx.astype(np.int16), val


def test_approx_path_with_full_budget_equals_the_exact_kernel():
    """budget 1 with room for every touched row: the same hits (ties too), filters and block splits."""
    import index.postings as postings

    idx, val = _sparse_world()
    P = postings.Postings.from_codes(idx, val, 2000)
    assert P.value_ordered
    rng = np.random.default_rng(1)
    qi, qv = rng.integers(0, 2000, (10, 5)), rng.random((10, 5)).astype(np.float32) + 0.05
    for require, exclude in [(None, None), ([int(qi[0, 0])], None), (None, [int(qi[0, 1])])]:
        for threads in (1, 2):
            De, Ie = P.search(qi, qv, 10, threads=threads, require=require, exclude=exclude)
            Da, Ia = P.search(qi, qv, 10, threads=threads, require=require, exclude=exclude,
                              approx=(1.0, 20_000, idx, val))  # fmt: skip
            np.testing.assert_array_equal(Ia, Ie)
            np.testing.assert_allclose(Da, De, rtol=1e-5)
    with pytest.raises(ValueError, match="budget"):
        P.search(qi, qv, 10, approx=(0.0, 10, idx, val))
    with pytest.raises(ValueError, match="candidates"):
        P.search(qi, qv, 10, approx=(0.5, 0, idx, val))


def test_a_lone_query_on_numba_threads_answers_as_the_serial_kernels(monkeypatch):
    """One query over several blocks runs on numba's threads (block ranges, then merged): the same hits as
    the one-thread kernels, exact and approximate, with filters and ties."""
    import index.postings as postings

    idx, val = _sparse_world(seed=5)
    P = postings.Postings.from_codes(idx, val, 2000)
    rng = np.random.default_rng(6)
    qi, qv = rng.integers(0, 2000, (8, 5)), rng.random((8, 5)).astype(np.float32) + 0.05
    monkeypatch.setattr(postings, "LONE_MIN", 1)  # these small queries qualify too
    q_lat, _, q_len = postings._pack_queries(qi[:1], qv[:1], 2000)
    assert P._lone(1, 2, q_lat, q_len, 1.0)  # the path under test is the one taken
    postings._LONE.release()
    assert not P._lone(2, 2, *postings._pack_queries(qi[:2], qv[:2], 2000)[::2], 1.0)  # batches: pieces
    for q in range(8):
        for require, exclude in [(None, None), ([int(qi[q, 0])], None), (None, [int(qi[q, 1])])]:
            one = dict(require=require, exclude=exclude)
            De, Ie = P.search(qi[q : q + 1], qv[q : q + 1], 10, threads=1, **one)
            Dl, Il = P.search(qi[q : q + 1], qv[q : q + 1], 10, threads=2, **one)
            np.testing.assert_array_equal(Il, Ie)
            np.testing.assert_allclose(Dl, De, rtol=1e-5)
            for budget in (1.0, 0.3):
                a = (budget, 20_000, idx, val)
                Ds, Is = P.search(qi[q : q + 1], qv[q : q + 1], 10, threads=1, approx=a, **one)
                Dp, Ip = P.search(qi[q : q + 1], qv[q : q + 1], 10, threads=2, approx=a, **one)
                np.testing.assert_array_equal(Ip, Is)
                np.testing.assert_allclose(Dp, Ds, rtol=1e-5)
                if budget == 1.0:
                    np.testing.assert_array_equal(Ip, Ie)


def test_approx_budget_reads_its_share_and_scores_exactly():
    """A smaller budget reads fewer entries (the cut is where the histogram says), recall falls
    gracefully, and whatever comes back has its exact score; row-ordered lists (parts written before
    value order) answer the same as value-ordered ones."""
    import index.postings as postings

    idx, val = _sparse_world(seed=8)
    n, L = len(idx), 2000
    P = postings.Postings.from_codes(idx, val, L)
    G = np.zeros((n, L), dtype=np.float32)
    np.put_along_axis(G, idx.astype(np.int64), val.astype(np.float32), 1)
    rng = np.random.default_rng(2)
    rows = rng.integers(0, n, 40)  # queries: noisy copies of items (their neighbours exist)
    qi = idx[rows].astype(np.int64)
    qv = val[rows].astype(np.float32) * rng.uniform(0.7, 1.3, idx[rows].shape).astype(np.float32)
    S = np.zeros((40, n), dtype=np.float32)
    for q in range(40):
        on = qv[q] > 0
        S[q] = G[:, qi[q][on]] @ qv[q][on]
    kth = -np.sort(-S, axis=1)[:, 9]
    q_lat, q_w, q_len = postings._pack_queries(qi, qv, L)
    hist, suffix, vmax = P.value_histogram()
    assert (vmax >= np.asarray([P.posting(j)[1].max(initial=0) for j in range(L)])).all()
    recalls = []
    for budget in (0.05, 0.2, 0.5):
        tau = np.zeros(40, dtype=np.float32)
        postings._budget_taus(q_lat, q_w, q_len, suffix, hist, vmax, np.ones(L, np.float32), budget, tau)
        read = total = 0
        for q in range(40):
            for t in range(q_len[q]):
                _, v = P.posting(int(q_lat[q, t]))
                read += int((v * q_w[q, t] >= tau[q]).sum())
                total += len(v)
        assert abs(read / total - budget) < 0.35 * budget + 0.01, (budget, read / total)
        D, I = P.search(qi, qv, 10, approx=(budget, 200, idx, val))
        for q in range(40):
            got = I[q][I[q] >= 0]
            np.testing.assert_allclose(D[q][: len(got)], S[q, got], rtol=1e-4, atol=1e-5)  # exact scores
        recalls.append(float(np.mean(D >= kth[:, None] - 1e-4)))
    assert recalls[0] <= recalls[1] <= recalls[2] and recalls[2] >= 0.95, recalls
    assert recalls[0] < 1.0  # a small budget does skip work that matters here
    seg = np.repeat(np.arange(len(P.offsets) - 1), np.diff(P.offsets))
    o = np.lexsort((np.asarray(P.items), seg))  # the same lists, row-ordered, no histogram
    R = postings.Postings(P.offsets, np.asarray(P.items)[o], np.asarray(P.values)[o], n, L)
    assert not R.value_ordered
    for budget in (0.05, 0.5):
        Dv, Iv = P.search(qi, qv, 10, approx=(budget, 200, idx, val), threads=1)
        Dr, Ir = R.search(qi, qv, 10, approx=(budget, 200, idx, val), threads=1)
        np.testing.assert_allclose(Dr, Dv, rtol=1e-5)


def test_approx_path_through_the_searcher(random_ckpt, tmp_path):
    feats = _feats(tmp_path, 3000, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False, dense=False)
    s = Searcher(tmp_path / "b")
    xq = np.load(feats)[:20] + 0.05 * np.random.default_rng(5).standard_normal((20, 32)).astype(np.float32)
    exact = s.search(("img", xq), top_k=10)
    full = s.search(("img", xq), top_k=10, path="approx", budget=1.0, candidates=3000)
    assert full.path == "approx" and full.ids == exact.ids
    approx = s.search(("img", xq), top_k=10, path="approx")
    assert [a[0] for a in approx.ids] == list(range(20))  # each query's own item first
    code = s.encode("img", xq)
    for q in range(20):
        for item, score in zip(approx.ids[q], approx.scores[q]):
            assert abs(sum(e.contribution for e in s.explain(code, item, top=64, row=q)) - score) < 1e-4
    lat = int(code.indices[0, 0])
    filtered = s.search(("img", xq[:1]), top_k=5, path="approx", require=[lat], budget=1.0, candidates=3000)
    assert filtered.ids == s.search(("img", xq[:1]), top_k=5, require=[lat]).ids
    with pytest.raises(ValueError, match="budget must be in"):
        s.search(("img", xq), path="approx", budget=1.5)


def _search_in_child(queue) -> None:  # runs in a forked child
    import index.postings as postings

    rng = np.random.default_rng(0)
    P = postings.Postings.from_codes(rng.integers(0, 32, (5000, 4)), rng.random((5000, 4)) + 0.1, 32)
    D, _ = P.search(rng.integers(0, 32, (8, 3)), rng.random((8, 3)).astype(np.float32) + 0.1, 5, threads=2)
    postings.PIECE_POSTINGS = 2_000_000  # a lone query that would go to numba's threads, were this no child
    two = postings.Postings.from_codes(rng.integers(0, 32, (70_000, 4)), rng.random((70_000, 4)) + 0.1, 32)
    D1, _ = two.search(rng.integers(0, 32, (1, 3)), rng.random((1, 3)).astype(np.float32) + 0.1, 5, threads=2)
    queue.put(bool(np.isfinite(D).all() and np.isfinite(D1).all() and postings._LONE_FORKED))


def test_search_in_a_forked_child_does_not_hang(monkeypatch):
    """The thread pool is process-wide; a forked child (a worker process) must start its own, not wait on
    threads that do not exist there (nor on numba's: a lone query in the child runs in pieces instead)."""
    import multiprocessing as mp

    import index.postings as postings

    rng = np.random.default_rng(1)
    two = postings.Postings.from_codes(rng.integers(0, 32, (70_000, 4)), rng.random((70_000, 4)) + 0.1, 32)
    q_lat, _, q_len = postings._pack_queries(np.array([[1, 2, 3]]), np.ones((1, 3), np.float32), 32)
    assert two._lone(1, 2, q_lat, q_len, 1.0)  # numba's threads (OpenMP where present) up
    postings._LONE.release()
    two.search(np.array([[1, 2, 3]]), np.ones((1, 3), np.float32), 5, threads=2)
    monkeypatch.setattr(postings, "PIECE_POSTINGS", 10)  # several pieces: the pool is used
    P = postings.Postings.from_codes(rng.integers(0, 32, (5000, 4)), rng.random((5000, 4)) + 0.1, 32)
    P.search(rng.integers(0, 32, (8, 3)), rng.random((8, 3)).astype(np.float32) + 0.1, 5, threads=2)  # pool up
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_search_in_child, args=(q,))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and q.get(timeout=5) is True


def test_item_ids_lookup_without_python_objects(tmp_path):
    from index.bundle import atomic_save_npy as _save_npy
    from index.ids import ItemIds, read_ids, write_ids

    rng = np.random.default_rng(4)
    ints = rng.permutation(50_000).astype(np.int64) * 7 - 3
    strs = np.array([f"img/{i:06d}.jpg" for i in rng.permutation(5_000)] + ["é-ünïcode", ""])
    for ids in (ints, strs):
        d = tmp_path / str(ids.dtype.kind)
        d.mkdir()
        kind = write_ids(d, ids, _save_npy)
        got = read_ids(d, kind, len(ids))
        rows = rng.integers(0, len(ids), 200)
        want = ids[rows].tolist()
        np.testing.assert_array_equal(got.find(want), rows)
        assert got.take(rows) == want and got.at(int(rows[0])) == want[0]
        missing = [10**12 + 1, -1] if kind == "int" else ["nope", "img/999999.jpg"]
        assert (got.find(missing) == -1).all()
        assert got.duplicates() == []
    assert ItemIds.from_array(np.array([5, 3, 5, 9, 3])).duplicates() == [3, 5]
    assert ItemIds.from_array(np.array(["a", "b", "a"])).duplicates() == ["a"]


def test_a_model_that_encodes_otherwise_than_the_index_is_refused_everywhere(random_ckpt, tmp_path):
    """The index records the checkpoint and the soft weight its items were encoded at: a model whose soft
    weight was changed after loading, or an in-memory model with no checkpoint identity, can neither build
    an index nor search one (library calls included), and the error says what to do."""
    feats = _feats(tmp_path, 60, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    loaded = load_checkpoint(random_ckpt)
    assert Searcher(tmp_path / "b", model=loaded).search(("txt", np.load(_feats(tmp_path, 2, 24, name="q.npy"))), top_k=3).ids
    changed = load_checkpoint(random_ckpt)
    changed.set_soft_weight(0.5)
    with pytest.raises(BundleError, match="soft weight 0.5, its checkpoint"):
        build_bundle(random_ckpt, "img", feats, tmp_path / "c", progress=False, model=changed)
    with pytest.raises(BundleError, match=r"encoded at soft weight 0, the model encodes queries at 0.5"):
        Searcher(tmp_path / "b", model=changed)
    fresh = SparcModel(SparcConfig(streams={"img": 32, "txt": 24}, n_latents=128, k=8, auxk=8), seed=1)
    with pytest.raises(BundleError, match="carries no checkpoint identity"):
        Searcher(tmp_path / "b", model=fresh)
    with pytest.raises(BundleError, match="is not checkpoint"):
        build_bundle(random_ckpt, "img", feats, tmp_path / "c", progress=False, model=fresh)
    assert Searcher(tmp_path / "b", model=fresh, checkpoint_sha256=checkpoint_hash(random_ckpt)).n_items == 60


def test_the_code_an_index_holds_is_read_from_its_manifest_when_filling_and_querying(trained_checkpoint, medium_synth, tmp_path):
    """A bundle built with code="agreed" stores agreed codes, says so in its manifest, and every query on it
    (Searcher.encode, a raw-vector search, the service's batcher) is encoded as the same code."""
    from service.engine import EncodeBatcher, Engine
    from service.errors import InvalidArgument

    feats = medium_synth / "eval" / "dino.npy"
    build_bundle(trained_checkpoint, "dino", feats, tmp_path / "agreed", code="agreed", progress=False)
    s = Searcher(tmp_path / "agreed")
    assert s.manifest.code == "agreed"
    x = torch.from_numpy(np.load(feats)[:40])
    agreed, search = (s.model.encode({"dino": x}, code=c) for c in ("agreed", "search"))
    assert not torch.equal(agreed.values, search.values)  # the two codes differ on this checkpoint
    idx, _ = s.shards[0].codes(np.arange(40))
    assert np.array_equal(np.sort(idx, 1), np.sort(agreed.indices.numpy(), 1))
    xq = np.load(medium_synth / "eval" / "clip_txt.npy")[:30]
    q = s.encode("clip_txt", xq)
    expect = s.model.encode({"clip_txt": torch.from_numpy(xq)}, code="agreed")
    assert torch.equal(q.indices, expect.indices) and torch.equal(q.values, expect.values)
    by_vectors = s.search(("clip_txt", xq), top_k=5, path="sparse")
    by_code = s.search(expect, top_k=5, path="sparse")
    assert by_vectors.ids == by_code.ids
    batcher = EncodeBatcher(s.model, {}, max_size=64, max_wait_ms=0)
    try:
        got = batcher.submit("clip_txt", "features", xq, None, "agreed").result(timeout=30)
        assert torch.equal(got.values, expect.values)
    finally:
        batcher.close()
    infos = {"a": s.info(), "b": Searcher(tmp_path / "agreed").info()}
    assert Engine.code_kind(["a", "b"], infos) == "agreed"
    build_bundle(trained_checkpoint, "dino", feats, tmp_path / "search", progress=False)
    infos["c"] = Searcher(tmp_path / "search").info()
    with pytest.raises(InvalidArgument, match="hold different codes"):
        Engine.code_kind(["a", "c"], infos)


def test_a_negative_boost_lowers_the_score_as_numpy_brute_force_says(random_ckpt, tmp_path):
    """Boosted query weights (one negative) score every item as the dense dot product of the boosted query
    with the stored codes: the kernel keeps negative weights (it used to drop them, so an item holding a
    down-weighted latent scored higher than its explanation said)."""
    from index.queries import _boosted, unit_code

    feats = _feats(tmp_path, 400, 32)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    s = Searcher(tmp_path / "b")
    code = s.encode("txt", np.random.default_rng(9).standard_normal((12, 24)).astype(np.float32))
    first = int(code.indices[0, 0])
    boost = {first: -0.6, int(code.indices[1, 2]): -0.3, 127: 0.4}
    q_idx, q_val = _boosted(*unit_code(code), boost)
    Q = np.zeros((12, 128), np.float64)
    for r in range(12):
        np.add.at(Q[r], q_idx[r], q_val[r])
    gal = s.model.encode({"img": torch.from_numpy(np.load(feats))})
    g = torch.nn.functional.normalize(gal.values, dim=1).half().float().numpy()
    G = np.zeros((400, 128))
    np.put_along_axis(G, gal.indices.numpy(), g, 1)
    expected = Q @ G.T
    res = s.search(code, top_k=8, path="sparse", boost=boost)
    for r in range(12):
        want = np.sort(expected[r][expected[r] > 0])[::-1][:8]
        np.testing.assert_allclose(res.scores[r], want, rtol=1e-3, atol=1e-4)
        for item, score in zip(res.ids[r], res.scores[r]):
            parts = s.explain(code, item, top=128, row=r, boost=boost)
            assert sum(e.contribution for e in parts) == pytest.approx(score, rel=1e-3, abs=1e-4)


def test_negative_boosts_leave_the_approximate_path_as_close_to_exact_as_without_them(random_ckpt, tmp_path):
    """On the approx path a negative weight picks no candidate and takes none of the budget (the exact
    rescoring applies it): with several latents boosted down, recall@10 against numpy brute force stays
    where it is without boosts (it fell to ~0 when those lists ate the budget and filled the candidates)."""
    from index.queries import _boosted, unit_code

    feats = _feats(tmp_path, 6000, 32, seed=4)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False)
    s = Searcher(tmp_path / "b")
    code = s.encode("txt", np.random.default_rng(11).standard_normal((60, 24)).astype(np.float32))
    gal = s.model.encode({"img": torch.from_numpy(np.load(feats))})
    G = np.zeros((6000, 128))
    np.put_along_axis(G, gal.indices.numpy(), torch.nn.functional.normalize(gal.values, dim=1).half().float().numpy(), 1)

    def recall(boost):
        q_idx, q_val = _boosted(*unit_code(code), boost) if boost else unit_code(code)
        Q = np.zeros((60, 128))
        for r in range(60):
            np.add.at(Q[r], q_idx[r], q_val[r])
        S = Q @ G.T
        got = s.search(code, top_k=10, path="approx", boost=boost, budget=0.3, candidates=64)
        hits = []
        for r in range(60):
            want = [i for i in np.argsort(-S[r], kind="stable")[:10] if S[r, i] > 0]
            hits.append(len(set(want) & set(got.ids[r])) / max(1, len(want)))
        return float(np.mean(hits))

    plain = recall(None)
    common = np.bincount(code.indices.numpy().ravel(), minlength=128).argsort()[::-1][:5]  # the queries' commonest
    down = recall({int(j): -0.3 for j in common})
    assert plain > 0.5 and down >= plain - 0.1, (plain, down)


def test_negative_boosts_are_rescored_on_the_seismic_path(random_ckpt, tmp_path):
    """Seismic picks candidates with the positive weights; the exact rescoring applies the negative ones, so
    every hit's score is numpy's dot product of the boosted query with its stored code, the hits come best
    first, and their explanations add up to it (a negative weight used to be dropped from the score)."""
    pytest.importorskip("seismic")
    from index.bundle import add_seismic_index
    from index.queries import _boosted, unit_code
    from index.seismic_backend import SeismicSettings

    feats = _feats(tmp_path, 3000, 32, seed=6)
    build_bundle(random_ckpt, "img", feats, tmp_path / "b", progress=False, dense=False)
    add_seismic_index(tmp_path / "b", SeismicSettings(heap_factor=1.0))
    s = Searcher(tmp_path / "b")
    code = s.encode("txt", np.random.default_rng(12).standard_normal((30, 24)).astype(np.float32))
    common = np.bincount(code.indices.numpy().ravel(), minlength=128).argsort()[::-1][:4]
    boost = {int(j): -0.4 for j in common}
    q_idx, q_val = _boosted(*unit_code(code), boost)
    gal = s.model.encode({"img": torch.from_numpy(np.load(feats))})
    G = np.zeros((3000, 128))
    np.put_along_axis(G, gal.indices.numpy(), torch.nn.functional.normalize(gal.values, dim=1).half().float().numpy(), 1)
    got = s.search(code, top_k=10, path="seismic", boost=boost)
    exact = s.search(code, top_k=10, path="sparse", boost=boost)
    n_hits, overlap = 0, []
    for r in range(30):
        Q = np.zeros(128)
        np.add.at(Q, q_idx[r], q_val[r])
        want = G[np.asarray(got.ids[r], dtype=np.int64)] @ Q
        np.testing.assert_allclose(got.scores[r], want, rtol=1e-3, atol=1e-4)
        assert got.scores[r] == sorted(got.scores[r], reverse=True)
        for item, score in zip(got.ids[r], got.scores[r]):
            assert sum(e.contribution for e in s.explain(code, item, top=128, row=r, boost=boost)) == pytest.approx(
                score, abs=1e-4
            )
        n_hits += len(got.ids[r])
        overlap.append(len(set(got.ids[r]) & set(exact.ids[r])) / max(1, len(exact.ids[r])))
    assert n_hits > 0 and np.mean(overlap) > 0.5


def test_hits_carry_where_they_are_stored_and_explanations_are_read_from_there(random_ckpt, tmp_path, monkeypatch):
    """Two shards, the second of two parts with deletions: every hit's (shard, part, row) is its item's, and
    explaining hits reads their codes from those rows (no id -> row lookup), equal to explaining by id."""
    from index import Bundle, append_to_bundle, delete_items
    from service.engine import Engine
    from service.settings import load_settings

    feats = np.random.default_rng(5).standard_normal((900, 32)).astype(np.float32)
    ids = np.array([f"it-{i:04d}" for i in range(900)])
    for name, sl in (("a", slice(0, 400)), ("b", slice(400, 650)), ("more", slice(650, 900))):
        np.save(tmp_path / f"{name}.npy", feats[sl])
        np.save(tmp_path / f"{name}_ids.npy", ids[sl])
    build_bundle(random_ckpt, "img", tmp_path / "a.npy", tmp_path / "A", ids=tmp_path / "a_ids.npy", progress=False)
    build_bundle(random_ckpt, "img", tmp_path / "b.npy", tmp_path / "B", ids=tmp_path / "b_ids.npy", progress=False)
    append_to_bundle(tmp_path / "B", tmp_path / "more.npy", ids=tmp_path / "more_ids.npy", progress=False)
    delete_items(tmp_path / "B", ids[400:900:9].tolist())
    s = Searcher([tmp_path / "A", tmp_path / "B"])
    assert len(s.shards[1].parts) == 2
    code = s.encode("txt", np.random.default_rng(6).standard_normal((16, 24)).astype(np.float32))
    seen_parts = set()
    for path in ("sparse", "dense", "approx"):
        res = s.search(code, top_k=30, path=path)
        for q in range(16):
            assert len(res.locs[q]) == len(res.ids[q]) > 0
            for (shard, part, row), item, sh in zip(res.locs[q].tolist(), res.ids[q], res.shards[q]):
                b = s.shards[shard]
                assert shard == sh and b.row_of(item) == row and row - b.parts[part].row0 in range(b.parts[part].n_items)
                seen_parts.add((shard, part))
            want = [s.explain(code, item, top=64, row=q) for item in res.ids[q]]
            with monkeypatch.context() as m:  # no id -> row lookup while explaining hits
                m.setattr(Bundle, "row_of", lambda *a: pytest.fail("an explanation looked an id up"))
                got = s.explain_hits(code, res, q, range(len(res.ids[q])), top=64, row=q)
            assert [[(e.latent, e.contribution) for e in x] for x in got] == [
                [(e.latent, e.contribution) for e in x] for x in want
            ]
            if path == "sparse":
                assert all(abs(sum(e.contribution for e in x) - sc) < 1e-4 for x, sc in zip(got, res.scores[q]))
    assert seen_parts == {(0, 0), (1, 0), (1, 1)}

    base = {"checkpoint": str(random_ckpt), "indexes": {"g": [str(tmp_path / "A"), str(tmp_path / "B")]}, "port": 0,
            "metrics_port": 0, "device": "cpu"}  # fmt: skip
    engine = Engine(load_settings(overrides=base, environ={}))
    try:
        from index import SearchParams
        from service.engine import QuerySpec, SearchSpec

        vec = np.random.default_rng(7).standard_normal(24).astype(np.float32)
        spec = SearchSpec(QuerySpec(stream="txt", vector=vec), ["g"], SearchParams.create(top_k=10, path="sparse"), explain=True)
        with monkeypatch.context() as m:
            m.setattr(Bundle, "row_of", lambda *a: pytest.fail("the service looked an id up to explain a hit"))
            ((qcode, hits),) = engine.search([spec])
        assert len(hits) == 10
        for h in hits:
            shard, part, row = h.loc
            assert s.shards[shard].row_of(h.id) == row and s.shards[shard].part_at([row])[0] == part
            want = s.explain(qcode, h.id, top=8)
            assert [(e.latent, e.contribution) for e in h.explanation] == [(e.latent, e.contribution) for e in want]
            assert abs(sum(e.contribution for e in s.explain(qcode, h.id, top=64)) - h.score) < 1e-4
    finally:
        engine.close()
