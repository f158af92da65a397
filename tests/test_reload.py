"""A new complete version of a served index lands in a running service without a restart: the server
notices it (poll, SIGHUP, ``reload_now``), opens and checks it beside the old one, and switches; calls in
flight finish on the version they started with, each hit names the version it came from, and a version
that cannot serve is refused while the old one keeps serving."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from index import append_to_bundle, build_bundle
from index.manifest import current_version
from service.client import SparcClient, make_query, search_request
from service.server import SparcServer
from service.settings import load_settings
from sparc_core import SparcConfig, SparcModel, save_checkpoint
from tests.conftest import searching


def _server(checkpoint, bundle, **extra) -> SparcServer:
    base = {"checkpoint": str(checkpoint), "indexes": {"dino": [str(bundle)]}, "port": 0, "metrics_port": 0}
    return SparcServer(load_settings(overrides=base | extra, environ={})).start()


@pytest.fixture()
def bundle(trained_checkpoint, medium_synth, tmp_path):
    feats = np.load(medium_synth / "eval" / "dino.npy")
    np.save(tmp_path / "first.npy", feats[:400])
    np.save(tmp_path / "more.npy", feats[400:])
    build_bundle(trained_checkpoint, "dino", tmp_path / "first.npy", tmp_path / "b", progress=False)
    return tmp_path / "b"


def test_a_new_version_is_swapped_in_under_concurrent_searches(trained_checkpoint, medium_synth, bundle, tmp_path):
    srv = _server(trained_checkpoint, bundle, reload_poll_seconds=0)
    queries = np.load(medium_synth / "eval" / "clip_txt.npy")
    old = current_version(bundle).name
    seen: list = []

    def record(r) -> None:
        seen.append({h.index_version for h in r.hits} | {str(max(int(h.id) for h in r.hits))})

    with searching(srv.port, queries, 20, 7, record) as errors:
        time.sleep(0.5)
        append_to_bundle(bundle, tmp_path / "more.npy", progress=False)  # a new version: 600 items
        new = current_version(bundle).name
        outcome = srv.reload_now()
        assert outcome["dino"].startswith("reloaded") and new in outcome["dino"], outcome
        time.sleep(0.5)
    with SparcClient(f"127.0.0.1:{srv.port}") as c:
        info = {i.name: i for i in c.list_indexes()}["dino"]
        assert info.n_items == 600 and info.version == new
    srv.stop(0)
    assert not errors, errors[:5]
    versions = [s - {x for x in s if x.isdigit()} for s in seen]
    assert all(len(v) == 1 for v in versions), "a response mixed versions"
    before = [i for i, v in enumerate(versions) if v == {old}]
    after = [i for i, v in enumerate(versions) if v == {new}]
    assert before and after and len(before) + len(after) == len(versions)
    # every answer from the new version can see the new items (ids 400..599), none from the old one can
    assert all(max(int(x) for x in seen[i] if x.isdigit()) < 400 for i in before)


def test_a_version_that_cannot_serve_is_refused_and_the_old_one_keeps_serving(trained_checkpoint, medium_synth, bundle, tmp_path):
    srv = _server(trained_checkpoint, bundle, reload_poll_seconds=0)
    old = current_version(bundle).name
    dims = {s: np.load(medium_synth / "eval" / f"{s}.npy", mmap_mode="r").shape[1] for s in ("dino", "clip_img", "clip_txt")}
    other = save_checkpoint(SparcModel(SparcConfig(streams=dims, n_latents=192, k=8), seed=3), tmp_path / "other")
    build_bundle(other, "dino", tmp_path / "first.npy", bundle, progress=False)  # another checkpoint's version
    try:
        outcome = srv.reload_now()
        assert outcome["dino"].startswith("refused") and "checkpoint" in outcome["dino"], outcome
        assert srv.metrics.index_reloads.labels("dino", "refused")._value.get() == 1
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            q = np.load(medium_synth / "eval" / "clip_txt.npy")[0]
            hits = c.search(search_request(make_query(stream="clip_txt", vector=q), ["dino"], top_k=3)).hits
            assert hits and {h.index_version for h in hits} == {old}
            assert c.health("index/dino") == "SERVING"
        assert srv.reload_now()["dino"].startswith("refused")  # still refused, still the old version
    finally:
        srv.stop(0)


def test_the_server_polls_for_new_versions(trained_checkpoint, bundle, tmp_path):
    srv = _server(trained_checkpoint, bundle, reload_poll_seconds=0.2)
    try:
        append_to_bundle(bundle, tmp_path / "more.npy", progress=False)
        deadline = time.monotonic() + 10
        while srv.engine.infos["dino"].n_items != 600 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.engine.infos["dino"].n_items == 600
        assert srv.metrics.index_items.labels("dino")._value.get() == 600
    finally:
        srv.stop(0)


def test_reload_index_is_an_admin_call_behind_its_own_token(trained_checkpoint, bundle, tmp_path):
    from service.wire import pb

    (tmp_path / "search.token").write_text("search-token")
    (tmp_path / "admin.token").write_text("admin-token")
    srv = _server(trained_checkpoint, bundle, reload_poll_seconds=0, auth_token_file=str(tmp_path / "search.token"),
                  admin_token_file=str(tmp_path / "admin.token"))  # fmt: skip
    off = _server(trained_checkpoint, bundle, reload_poll_seconds=0)
    try:
        with SparcClient(f"127.0.0.1:{srv.port}", token="search-token") as c:
            for token, code in (("search-token", grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
                with pytest.raises(grpc.RpcError) as e:
                    c.reload_index(token)
                assert e.value.code() == code
            assert c.reload_index("admin-token") == {"dino": "unchanged"}
            append_to_bundle(bundle, tmp_path / "more.npy", progress=False)
            got = c.reload_index("admin-token", ["dino"])
            assert got["dino"].startswith("reloaded") and current_version(bundle).name in got["dino"]
            with pytest.raises(grpc.RpcError) as e:
                c.reload_index("admin-token", ["nope"])
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert c.list_indexes()[0].n_items == 600  # the search token still searches
        with SparcClient(f"127.0.0.1:{off.port}") as c, pytest.raises(grpc.RpcError) as e:
            c.reload_index("anything")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "admin_token_file" in e.value.details()
        assert pb.DESCRIPTOR.services_by_name["SparcAdminService"]
    finally:
        srv.stop(0)
        off.stop(0)
