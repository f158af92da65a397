"""Deleting items: tombstones in a new version, never returned by any path, and a compaction that equals a
fresh build of what is left."""

from __future__ import annotations

import numpy as np
import pytest

from index import Bundle, Searcher, build_bundle, compact_bundle, delete_items
from index.errors import BundleError
from index.manifest import current_version


@pytest.fixture()
def world(trained_checkpoint, medium_synth, tmp_path):
    feats = np.load(medium_synth / "eval" / "dino.npy")
    ids = np.array([f"img-{i:04d}" for i in range(len(feats))])
    np.save(tmp_path / "g.npy", feats)
    np.save(tmp_path / "ids.npy", ids)
    build_bundle(trained_checkpoint, "dino", tmp_path / "g.npy", tmp_path / "b", ids=tmp_path / "ids.npy", progress=False)
    gone = np.random.default_rng(0).choice(len(ids), size=len(ids) // 10, replace=False)
    keep = np.setdiff1d(np.arange(len(ids)), gone)
    np.save(tmp_path / "g_kept.npy", feats[keep])
    np.save(tmp_path / "ids_kept.npy", ids[keep])
    build_bundle(trained_checkpoint, "dino", tmp_path / "g_kept.npy", tmp_path / "fresh", ids=tmp_path / "ids_kept.npy",
                 progress=False)  # fmt: skip
    queries = np.load(medium_synth / "eval" / "clip_txt.npy")[:200]
    return tmp_path, ids, set(ids[gone].tolist()), queries


def _top(searcher, queries, path):
    r = searcher.search(("clip_txt", queries), top_k=10, path=path)
    return r.ids, r.scores


def test_deleted_items_never_come_back_and_exact_paths_equal_a_fresh_build(world):
    root, ids, gone, queries = world
    before = current_version(root / "b").name
    vdir, unknown, n = delete_items(root / "b", [*sorted(gone), "no-such-id", sorted(gone)[0]])
    assert n == len(gone) and unknown == ["no-such-id"] and vdir.name != before
    s, fresh = Searcher(root / "b"), Searcher(root / "fresh")
    assert s.n_items == fresh.n_items == len(ids) - len(gone)
    for path in ("sparse", "dense"):
        got, want = _top(s, queries, path), _top(fresh, queries, path)
        assert got[0] == want[0], path  # the same ids, in the same order
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    approx = _top(s, queries, "approx")[0]
    assert not gone & {i for row in approx for i in row}
    b = s.shards[0]
    assert not gone & set(b.all_ids()) and not b.contains(sorted(gone)).any() and b.contains(sorted(gone), deleted=True).all()
    victim = sorted(gone)[0]
    with pytest.raises(KeyError):
        s.item_code(victim)
    for lat in range(0, s.model.n_latents, 7):
        _, top = s.latent_top_items(lat, 50)
        assert not gone & {i for i, _ in top}
    assert delete_items(root / "b", [victim])[1:] == ([victim], 0)  # already deleted: reported, no new version


def test_compaction_equals_a_fresh_build_of_what_is_left(world):
    root, ids, gone, queries = world
    delete_items(root / "b", sorted(gone))
    compact_bundle(root / "b", progress=False)
    b = Bundle(root / "b")
    assert b.manifest.n_items == len(ids) - len(gone) and not any(len(p.deleted) for p in b.parts)
    s, fresh = Searcher(root / "b"), Searcher(root / "fresh")
    for path in ("sparse", "approx", "dense"):
        got, want = _top(s, queries, path), _top(fresh, queries, path)
        assert got[0] == want[0], path
    size = lambda p: sum(f.stat().st_size for f in current_version(p).rglob("*") if f.is_file())  # noqa: E731
    assert abs(size(root / "b") - size(root / "fresh")) <= 0.05 * size(root / "fresh")


def test_a_damaged_tombstone_file_is_refused(world):
    root, _, gone, _ = world
    vdir, _, _ = delete_items(root / "b", sorted(gone))
    np.save(vdir / "part-00000" / "deleted.npy", np.array([5, 3]))
    with pytest.raises(BundleError, match="deleted.npy"):
        Bundle(root / "b")


def test_delete_items_over_grpc_is_an_admin_call_and_served_at_once(world, trained_checkpoint, tmp_path):
    import grpc

    from service.client import SparcClient, make_query, search_request
    from service.server import SparcServer
    from service.settings import load_settings

    root, ids, gone, queries = world
    (tmp_path / "admin.token").write_text("admin-token")
    s = load_settings(overrides={"checkpoint": str(trained_checkpoint), "indexes": {"imgs": [str(root / "b")]}, "port": 0,
                                 "metrics_port": 0, "reload_poll_seconds": 0, "admin_token_file": str(tmp_path / "admin.token")},
                      environ={})  # fmt: skip
    srv = SparcServer(s).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            reqs = [search_request(make_query(stream="clip_txt", vector=q), ["imgs"], top_k=10) for q in queries[:50]]
            shown = {h.id for r in c.search_batch(reqs) for h in r.hits}
            victims = sorted(shown)[:25]
            with pytest.raises(grpc.RpcError) as e:
                c.delete_items("wrong", "imgs", victims)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            n, unknown = c.delete_items("admin-token", "imgs", [*victims, "nope"])
            assert n == len(victims) and unknown == ["nope"]
            after = {h.id for r in c.search_batch(reqs) for h in r.hits}
            assert not set(victims) & after and len(after) >= len(shown) - len(victims)
            assert {i.name: i.n_items for i in c.list_indexes()}["imgs"] == len(ids) - len(victims)
    finally:
        srv.stop(0)


def test_add_with_replace_is_an_upsert_in_one_version(world, medium_synth):
    from index import append_to_bundle

    root, ids, _, queries = world
    feats = np.load(medium_synth / "eval" / "dino.npy")
    np.save(root / "new.npy", feats[:20][::-1].copy())  # ids img-0000..img-0019 get other items' features
    np.save(root / "new_ids.npy", ids[:20])
    with pytest.raises(BundleError, match="duplicate item ids.*--replace"):
        append_to_bundle(root / "b", root / "new.npy", ids=root / "new_ids.npy", progress=False)
    append_to_bundle(root / "b", root / "new.npy", ids=root / "new_ids.npy", progress=False, replace=True)
    s = Searcher(root / "b")
    assert s.n_items == len(ids) and sorted(s.shards[0].all_ids()) == sorted(ids.tolist())
    idx, _ = s.item_code("img-0000")
    want = Searcher(root / "b").encode("dino", feats[19:20])
    assert set(idx.tolist()) == set(want.indices[0].tolist())  # the replaced id holds its new code
    assert s.shards[0].parts[0].deleted.tolist() == list(range(20))  # the old rows: deleted in the same version


def test_add_compacts_when_deletions_pass_the_threshold(world, medium_synth):
    from index import append_to_bundle

    root, ids, gone, _ = world
    delete_items(root / "b", sorted(gone))  # 10%: below the threshold, kept as tombstones
    feats = np.load(medium_synth / "eval" / "dino.npy")
    np.save(root / "one.npy", feats[:1])
    np.save(root / "one_id.npy", np.array(["extra-1"]))
    append_to_bundle(root / "b", root / "one.npy", ids=root / "one_id.npy", progress=False)
    assert sum(len(p.deleted) for p in Bundle(root / "b").parts) == len(gone)
    np.save(root / "two_id.npy", np.array(["extra-2"]))
    append_to_bundle(root / "b", root / "one.npy", ids=root / "two_id.npy", progress=False, compact_above=0.05)
    b = Bundle(root / "b")
    assert not any(len(p.deleted) for p in b.parts) and b.n_live == len(ids) - len(gone) + 2


def test_a_kill_during_delete_or_compact_leaves_a_loadable_version(world, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root, ids, gone, _ = world
    np.save(tmp_path / "gone.npy", np.array(sorted(gone)))
    live = {len(ids), len(ids) - len(gone)}
    for delay in (0.5, 1.2, 1.6, 2.0, 2.5):  # imports take about a second: kills before, during and after the work
        for cmd in (["index", "delete", "--bundle", str(root / "b"), "--ids", str(tmp_path / "gone.npy")],
                    ["index", "compact", "--bundle", str(root / "b"), "--quiet"]):  # fmt: skip
            p = subprocess.Popen(
                [sys.executable, "-m", "sparc_core.cli", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait()
            b = Bundle(root / "b")  # whatever the moment: the previous or the new version, complete
            assert b.n_live in live
            assert len(Searcher(root / "b").search(("dino", np.zeros((1, 64), np.float32) + 0.1), top_k=3).ids[0]) == 3
