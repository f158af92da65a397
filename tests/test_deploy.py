"""A checkpoint rollover: a deployment file (a checkpoint and the bundles built with it) switched as a whole
under concurrent searches, never mixing checkpoints, with a rollback."""

from __future__ import annotations

import time

import numpy as np
import pytest

from index import build_bundle
from index.manifest import current_version
from service.client import SparcClient, make_query, search_request
from service.deployment import read_deployment, rollback, write_deployment
from service.server import SparcServer
from service.settings import load_settings
from sparc_core import SparcConfig, SparcModel, checkpoint_hash, save_checkpoint
from tests.conftest import searching


@pytest.fixture()
def two(trained_checkpoint, medium_synth, tmp_path):
    dims = {s: np.load(medium_synth / "eval" / f"{s}.npy", mmap_mode="r").shape[1] for s in ("dino", "clip_img", "clip_txt")}
    other = save_checkpoint(SparcModel(SparcConfig(streams=dims, n_latents=160, k=8), seed=3), tmp_path / "other")
    feats = medium_synth / "eval" / "dino.npy"
    build_bundle(trained_checkpoint, "dino", feats, tmp_path / "a", progress=False)
    build_bundle(other, "dino", feats, tmp_path / "b", progress=False)
    return (trained_checkpoint, tmp_path / "a"), (other, tmp_path / "b")


def test_a_rollover_never_mixes_checkpoints_and_rolls_back(two, medium_synth, tmp_path):
    (ck_a, b_a), (ck_b, b_b) = two
    f = tmp_path / "deploy.json"
    write_deployment(f, str(ck_a), {"dino": [str(b_a)]})
    srv = SparcServer(load_settings(overrides={"deployment_file": str(f), "port": 0, "metrics_port": 0, "reload_poll_seconds": 0},
                                    environ={})).start()  # fmt: skip
    bundle_of = {checkpoint_hash(ck_a): current_version(b_a).name, checkpoint_hash(ck_b): current_version(b_b).name}
    queries = np.load(medium_synth / "eval" / "clip_txt.npy")
    seen: list = []
    with searching(
        srv.port, queries, 5, 5, lambda r: seen.append((r.checkpoint_sha256, {h.index_version for h in r.hits}))
    ) as errors:
        time.sleep(0.4)
        write_deployment(f, str(ck_b), {"dino": [str(b_b)]})
        assert srv.reload_now()["dino"].startswith("deployed")
        time.sleep(0.4)
        rollback(f)
        assert read_deployment(f).checkpoint == str(ck_a)
        assert srv.reload_now()["dino"].startswith("deployed")
        time.sleep(0.4)
    with SparcClient(f"127.0.0.1:{srv.port}") as c:
        assert c.list_indexes()[0].checkpoint_sha256 == checkpoint_hash(ck_a)
    srv.stop(0)
    assert not errors, errors[:5]
    # every answer: one checkpoint, and the hits of that checkpoint's own bundle
    assert all(versions == {bundle_of[ck]} for ck, versions in seen)
    order = [ck for ck, _ in seen]
    assert checkpoint_hash(ck_b) in order and order[-1] == checkpoint_hash(ck_a)


def test_a_deployment_that_cannot_load_is_refused_and_the_old_one_serves(two, medium_synth, tmp_path):
    (ck_a, b_a), (ck_b, b_b) = two
    f = tmp_path / "deploy.json"
    write_deployment(f, str(ck_a), {"dino": [str(b_a)]})
    srv = SparcServer(load_settings(overrides={"deployment_file": str(f), "port": 0, "metrics_port": 0, "reload_poll_seconds": 0},
                                    environ={})).start()  # fmt: skip
    try:
        write_deployment(f, str(ck_b), {"dino": [str(b_a)]})  # bundles of another checkpoint
        out = srv.reload_now()["dino"]
        assert out.startswith("refused") and "checkpoint" in out
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            q = np.load(medium_synth / "eval" / "clip_txt.npy")[0]
            r = c.search(search_request(make_query(stream="clip_txt", vector=q), ["dino"], top_k=3))
            assert r.hits and r.checkpoint_sha256 == checkpoint_hash(ck_a)
    finally:
        srv.stop(0)
