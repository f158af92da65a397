"""Milvus backend against embedded milvus-lite: export, search equal to the local exact search, identity
checks, resumable export, refusals, and the gRPC service over a Milvus index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from index import BundleError, Searcher, build_bundle  # noqa: E402
from index.milvus_backend import MilvusSearcher, MilvusTarget, check_index_type, export_bundle  # noqa: E402
from service.client import SparcClient  # noqa: E402
from service.server import SparcServer  # noqa: E402
from service.settings import load_settings  # noqa: E402
from sparc_core import SparcConfig, SparcModel, load_checkpoint, save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def world(trained_checkpoint, medium_synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("milvus")
    bundle = root / "dino"
    build_bundle(trained_checkpoint, "dino", medium_synth / "eval" / "dino.npy", bundle, progress=False)
    location = f"milvus-lite:{root / 'm.db'}/dino"
    assert export_bundle(str(bundle), location, batch=97, dense_index="FLAT", progress=False) > 0
    queries = np.load(medium_synth / "eval" / "clip_txt.npy")[:40]
    return bundle, location, queries


def _same_ranking(a_ids, a_scores, b_ids, b_scores, top_k):
    """Equal up to the order of tied scores: scores match rank by rank, and the items above the last
    (possibly tied) score are the same."""
    assert len(a_ids) == len(b_ids)
    np.testing.assert_allclose(a_scores, b_scores, rtol=1e-5, atol=1e-6)
    if len(a_scores) == top_k:
        last = a_scores[-1]
        assert {i for i, s in zip(a_ids, a_scores) if s > last + 1e-5} == {i for i, s in zip(b_ids, b_scores) if s > last + 1e-5}
    else:
        assert set(a_ids) == set(b_ids)


def test_a_negative_boost_scores_in_milvus_as_in_the_local_exact_search(world, trained_checkpoint):
    """Milvus's sparse search takes positive weights only: it finds candidates with them, and the hits are
    rescored with the whole boosted query from the codes that came with them, so the ranking equals the local
    exact search's (the negative weight used to be dropped)."""
    bundle, location, xq = world
    model = load_checkpoint(trained_checkpoint)
    local = Searcher(bundle, model=model)
    remote = MilvusSearcher(location, model)
    code = local.encode("clip_txt", xq)
    common = np.bincount(code.indices.numpy().ravel(), minlength=model.n_latents).argsort()[::-1][:3]
    boost = {int(j): -0.5 for j in common}
    a = local.search(code, top_k=10, boost=boost)
    b = remote.search(code, top_k=10, boost=boost)
    plain = local.search(code, top_k=10)
    assert a.ids != plain.ids  # the boost matters here
    for q in range(len(xq)):
        _same_ranking(a.ids[q], a.scores[q], b.ids[q], b.scores[q], 10)
        for x, score in zip(remote.explain_hits(code, b, q, range(len(b.ids[q])), top=64, row=q, boost=boost), b.scores[q]):
            assert sum(e.contribution for e in x) == pytest.approx(score, abs=1e-4)


def test_milvus_search_equals_local_exact_search(world, trained_checkpoint):
    bundle, location, xq = world
    model = load_checkpoint(trained_checkpoint)
    local = Searcher(bundle, model=model)
    remote = MilvusSearcher(location, model)
    assert remote.n_items == local.n_items and remote.manifest.checkpoint_sha256 == local.manifest.checkpoint_sha256
    for kw in ({}, {"require": [int(local.encode("clip_txt", xq[:1]).indices[0, 0])]}, {"exclude": [3, 5, 7]}):
        a = local.search(("clip_txt", xq), top_k=10, **kw)
        b = remote.search(("clip_txt", xq), top_k=10, **kw)
        hits = 0
        for q in range(len(xq)):
            _same_ranking(a.ids[q], a.scores[q], b.ids[q], b.scores[q], 10)
            hits += len(a.ids[q])
        assert hits > 0
    code = local.encode("clip_txt", xq[:1])
    item = a.ids[0][0]
    assert [e.latent for e in remote.explain(code, item)] == [e.latent for e in local.explain(code, item)]
    found = remote.search(code, top_k=10)
    get = remote.client.get
    remote.client.get = lambda *a, **k: pytest.fail("explaining a hit asked Milvus for its code again")
    try:  # the hits' codes came with the search reply
        got = remote.explain_hits(code, found, 0, range(len(found.ids[0])), top=64)
    finally:
        remote.client.get = get
    want = [local.explain(code, i, top=64) for i in found.ids[0]]
    assert [[e.latent for e in x] for x in got] == [[e.latent for e in x] for x in want] and len(got) == 10
    for x, y, score in zip(got, want, found.scores[0]):
        np.testing.assert_allclose([e.contribution for e in x], [e.contribution for e in y], rtol=1e-4, atol=1e-6)
        assert abs(sum(e.contribution for e in x) - score) < 1e-3
    dense_l = local.search(("clip_txt", xq), top_k=5, path="dense")
    dense_r = remote.search(("clip_txt", xq), top_k=5, path="dense")
    for q in range(len(xq)):
        np.testing.assert_allclose(dense_l.scores[q], dense_r.scores[q], rtol=1e-4, atol=1e-5)
    n_local, top_local = local.latent_top_items(int(code.indices[0, 0]), 5)
    n_remote, top_remote = remote.latent_top_items(int(code.indices[0, 0]), 5)
    assert n_local == n_remote > 0
    np.testing.assert_allclose([v for _, v in top_local], [v for _, v in top_remote], rtol=1e-3)


def test_a_mismatched_checkpoint_is_refused(world, tmp_path, medium_synth):
    _, location, _ = world
    other = SparcModel(SparcConfig(streams={"dino": 48, "clip_img": 40, "clip_txt": 32}, n_latents=256, k=8), seed=7)
    dims = {s: np.load(medium_synth / "eval" / f"{s}.npy", mmap_mode="r").shape[1] for s in ("dino", "clip_img", "clip_txt")}
    other = SparcModel(SparcConfig(streams=dims, n_latents=256, k=8), seed=7)
    ckpt = save_checkpoint(other, tmp_path / "other")
    build_bundle(ckpt, "dino", medium_synth / "eval" / "dino.npy", tmp_path / "b", progress=False)
    with pytest.raises(BundleError, match="holds checkpoint_sha256=.*export into another collection"):
        export_bundle(str(tmp_path / "b"), location, progress=False)
    with pytest.raises(BundleError, match="the model does not match"):
        MilvusSearcher(location, other)


def test_an_interrupted_export_resumes_without_duplicates(world, tmp_path, monkeypatch):
    bundle, _, _ = world
    location = f"milvus-lite:{tmp_path / 'r.db'}/resume"
    from pymilvus import MilvusClient

    real = MilvusClient.upsert
    calls = {"n": 0}

    def dying(self, name, data, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # killed in the middle of the fourth batch: half of it is in
            real(self, name, data[: len(data) // 2], *a, **k)
            raise KeyboardInterrupt("killed mid-batch")
        return real(self, name, data, *a, **k)

    monkeypatch.setattr(MilvusClient, "upsert", dying)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(str(bundle), location, batch=50, progress=False)
    monkeypatch.setattr(MilvusClient, "upsert", real)
    model_free = MilvusTarget.parse(location).client()
    assert model_free.query("resume", filter="", output_fields=["count(*)"])[0]["count(*)"] == 175
    with pytest.raises(BundleError, match="export did not finish"):
        MilvusSearcher(location, model=None)  # type: ignore[arg-type]
    written = export_bundle(str(bundle), location, batch=50, progress=False)
    n = Searcher(bundle).n_items
    assert written == n - 150  # the half-written batch again (upserted), then the rest
    assert model_free.query("resume", filter="", output_fields=["count(*)"])[0]["count(*)"] == n
    ids = [r["id"] for r in model_free.query("resume", filter="", output_fields=["id"], limit=n + 10)]
    assert len(ids) == len(set(ids)) == n  # no duplicate primary key
    assert export_bundle(str(bundle), location, batch=50, progress=False) == 0  # a complete export: nothing to do


def test_the_identity_check_compares_with_the_serving_checkpoint_and_the_bundle(
    world, tmp_path, medium_synth, trained_checkpoint
):  # noqa: E501
    """Same shape, another checkpoint: refused by the serving side (the hash, not n_latents); another bundle
    of the same checkpoint into the collection: refused, or replaced with --replace; after `index add`, a
    re-export adds the new items and the collection's manifest and count follow."""
    bundle, location, _ = world
    from index import append_to_bundle

    ckpt_path = Searcher(bundle).manifest.checkpoint_sha256
    with pytest.raises(BundleError, match="exported from checkpoint .* the model is"):
        MilvusSearcher(location, Searcher(bundle).model, checkpoint_sha256="0" * 64)
    assert MilvusSearcher(location, Searcher(bundle).model, checkpoint_sha256=ckpt_path).n_items == Searcher(bundle).n_items
    # another bundle of the same checkpoint and stream: other ids
    ckpt = Searcher(bundle).shards[0].manifest
    other = tmp_path / "other"
    n = Searcher(bundle).n_items
    ids = np.arange(10_000, 10_000 + n, dtype=np.int64)  # integer ids, as the exported bundle's, but others
    build_bundle(trained_checkpoint, "dino", medium_synth / "eval" / "dino.npy", other, ids=ids, progress=False)
    loc = f"milvus-lite:{tmp_path / 'i.db'}/ident"
    export_bundle(str(bundle), loc, batch=200, progress=False)
    with pytest.raises(BundleError, match="holds the items of another bundle"):
        export_bundle(str(other), loc, batch=200, progress=False)
    assert export_bundle(str(other), loc, batch=200, progress=False, replace=True) == n
    client = MilvusTarget.parse(loc).client()
    got = [r["id"] for r in client.query("ident", filter="", output_fields=["id"], limit=2 * n)]
    assert sorted(got) == list(range(10_000, 10_000 + n))  # only the new bundle's items, never a mix
    # index add + re-export: the new items only, the manifest and count current
    more = tmp_path / "more.npy"
    np.save(more, np.load(medium_synth / "eval" / "dino.npy")[:30])
    append_to_bundle(other, more, ids=np.arange(50_000, 50_030, dtype=np.int64), progress=False)
    assert export_bundle(str(other), loc, batch=200, progress=False) == n + 30 - (n // 200) * 200
    s = MilvusSearcher(loc, Searcher(other).model, checkpoint_sha256=ckpt.checkpoint_sha256)
    assert s.n_items == n + 30 and s.manifest.n_items == n + 30


def test_milvus_paths_and_an_unreachable_server(world, trained_checkpoint, monkeypatch):
    import index.milvus_backend as mb

    monkeypatch.setattr(mb, "CALL_TIMEOUT", 1.0)
    bundle, location, xq = world
    model = load_checkpoint(trained_checkpoint)
    remote = MilvusSearcher(location, model)
    exact = remote.search(("clip_txt", xq), top_k=10)
    approx = remote.search(("clip_txt", xq), top_k=10, path="approx", budget=1.0)
    assert approx.path == "approx" and approx.ids == exact.ids  # budget 1: nothing dropped
    with pytest.raises(BundleError, match="no Seismic index"):
        remote.search(("clip_txt", xq), top_k=10, path="seismic")
    from index.milvus_backend import GalleryUnavailable

    with pytest.raises(GalleryUnavailable, match="cannot reach Milvus at http://127.0.0.1:9"):
        MilvusSearcher("milvus://127.0.0.1:9/nothing", model)
    t = MilvusTarget.parse("milvus://db.example:19530/images?db_name=prod&secure=true")
    assert t == MilvusTarget("https://db.example:19530", "images", False, "prod")
    with pytest.raises(BundleError, match="unknown option"):
        MilvusTarget.parse("milvus://db.example:19530/images?tls=1")


def test_refusals_and_uris(tmp_path):
    with pytest.raises(BundleError, match="not built by embedded milvus-lite"):
        check_index_type("DISKANN", embedded=True)
    with pytest.raises(BundleError, match="not built by embedded milvus-lite"):
        check_index_type("GPU_CAGRA", embedded=True)
    check_index_type("DISKANN", embedded=False)
    assert MilvusTarget.parse("milvus://db.example:19530/images") == MilvusTarget("http://db.example:19530", "images", False)
    with pytest.raises(BundleError, match="expected milvus://HOST:PORT/COLLECTION"):
        MilvusTarget.parse("milvus://host")
    with pytest.raises(BundleError, match="must end in .db"):
        MilvusTarget.parse(f"milvus-lite:{tmp_path}/x/images")


def test_grpc_search_over_a_milvus_index_equals_the_local_bundle(world, trained_checkpoint):
    bundle, location, xq = world
    settings = load_settings(
        overrides={"checkpoint": str(trained_checkpoint), "indexes": {"local": [str(bundle)], "remote": [location]},
                   "port": 0, "metrics_port": 0},
        environ={},
    )  # fmt: skip
    srv = SparcServer(settings).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            for q in xq[:5]:
                a = c.search_vector("clip_txt", q, indexes=["local"], top_k=5, explain=True)
                b = c.search_vector("clip_txt", q, indexes=["remote"], top_k=5, explain=True)
                _same_ranking([h.id for h in a.hits], [h.score for h in a.hits], [h.id for h in b.hits],
                              [h.score for h in b.hits], 5)  # fmt: skip
                assert [h.explanation[0].latent for h in a.hits[:1]] == [h.explanation[0].latent for h in b.hits[:1]]
            names = {i.name: i for i in c.list_indexes()}
            assert names["remote"].n_items == names["local"].n_items
    finally:
        srv.stop(0)


def test_cli_export(world, tmp_path):
    from sparc_core.cli import main

    bundle, _, _ = world
    loc = f"milvus-lite:{tmp_path / 'c.db'}/cli"
    assert main(["index", "export", "--bundle", str(bundle), "--to", loc, "--quiet"]) == 0
    assert main(["index", "export", "--bundle", str(bundle), "--to", loc, "--quiet"]) == 0  # complete: nothing to do
    assert Path(tmp_path / "c.db").exists()


def test_deletes_reach_milvus_by_primary_key_and_by_re_export(world, trained_checkpoint, tmp_path):
    """Items deleted from a collection (or from its bundle, then exported again) are never returned."""
    import shutil

    from index import delete_items

    bundle, _, xq = world
    model = load_checkpoint(trained_checkpoint)
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    location = f"milvus-lite:{tmp_path / 'd.db'}/dino"
    export_bundle(str(copy), location, batch=200, progress=False)
    remote = MilvusSearcher(location, model)
    n = remote.n_items
    first = remote.search(("clip_txt", xq[:10]), top_k=5)
    victims = sorted({i for row in first.ids for i in row[:2]})
    deleted, unknown = remote.delete([*victims, 10**9])
    assert deleted == len(victims) and unknown == [10**9] and remote.n_items == n - len(victims)
    after = remote.search(("clip_txt", xq[:10]), top_k=5)
    assert not set(victims) & {i for row in after.ids for i in row}
    # deleted from the bundle, then exported again: the collection follows
    more = sorted({i for row in after.ids for i in row[:1]})
    delete_items(copy, more)
    export_bundle(str(copy), location, batch=200, progress=False)
    again = MilvusSearcher(location, model)
    assert not set(more) & {i for row in again.search(("clip_txt", xq[:10]), top_k=5).ids for i in row}
    assert again.n_items <= n - len(more)


def test_sparc_index_delete_takes_a_collection(world, tmp_path, capsys):
    from sparc_core.cli import main

    bundle, _, _ = world
    location = f"milvus-lite:{tmp_path / 'c.db'}/dino"
    export_bundle(str(bundle), location, batch=500, progress=False)
    np.save(tmp_path / "gone.npy", np.array([3, 5, 7, 10**9]))
    assert main(["index", "delete", "--bundle", location, "--ids", str(tmp_path / "gone.npy")]) == 0
    assert "3 items deleted; 1 ids not found" in capsys.readouterr().out
