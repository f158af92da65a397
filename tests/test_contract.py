"""The search contract: SearchParams validated once and hashable, every gallery keeping the Gallery
protocol with the same signatures, the merge over galleries, and each engine refusal's status code."""

from __future__ import annotations

import inspect
import json

import grpc
import numpy as np
import pytest

from index import Gallery, SearchParams, SearchResult, merge_galleries
from index.milvus_backend import MilvusSearcher
from index.params import ApproxParams, DenseParams, ExactParams, SeismicParams
from index.searcher import Searcher


def test_search_params_are_validated_once_normalised_and_hashable():
    p = SearchParams.create(top_k=5, path="approx", require=[3, 1, 3], exclude=(9,), boost={4: 0.5, 2: 1.0}, budget=0.2)
    assert p.settings == ApproxParams(0.2, 300) and p.require == (1, 3) and p.exclude == (9,)
    assert p.boost == ((2, 1.0), (4, 0.5)) and p.boost_map == {2: 1.0, 4: 0.5}
    same = SearchParams.create(top_k=5, path="approx", require=[1, 3], exclude=[9], boost={2: 1.0, 4: 0.5}, budget=0.2)
    assert same == p and len({p, same, SearchParams.create(top_k=5)}) == 2  # equal requests share one batch
    assert SearchParams.create().settings == ExactParams() and SearchParams.create().path == "sparse"
    assert SearchParams.create(path="dense", nprobe=8).settings == DenseParams(8, None)
    assert SearchParams.create(path="seismic", heap_factor=0.5).settings == SeismicParams(None, 0.5)
    for kw, field in (({"budget": 1.5}, "budget"), ({"budget": float("nan")}, "budget"), ({"candidates": 0}, "candidates"),
                      ({"heap_factor": 0.0}, "heap_factor"), ({"query_cut": -1}, "query_cut"), ({"top_k": 0}, "top_k"),
                      ({"path": "fuzzy"}, "search path")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            SearchParams.create(**kw)  # a value given for another path is still checked
    with pytest.raises(ValueError, match="takes DenseParams"):
        SearchParams("dense", 10, settings=ApproxParams())
    with pytest.raises(TypeError, match="not both"):
        SearchParams.of(p, top_k=3)
    assert SearchParams.of(p) is p and SearchParams.of(None, top_k=3).top_k == 3


def test_every_gallery_keeps_the_protocol_with_the_same_signatures():
    for name in ("search", "explain", "item_code", "latent_top_items", "info"):
        want = inspect.signature(getattr(Gallery, name))
        for cls in (Searcher, MilvusSearcher):
            got = inspect.signature(getattr(cls, name))
            assert list(got.parameters) == list(want.parameters), (cls.__name__, name, got, want)
    assert isinstance(Gallery.n_items, property) and isinstance(Searcher.n_items, property)
    assert isinstance(MilvusSearcher.n_items, property)


def test_a_local_gallery_is_a_gallery_and_answers_params_and_keywords_alike(tmp_path):
    import torch

    from index.bundle import build_bundle_from_codes
    from sparc_core import SparcConfig, SparcModel, SparseCode

    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(32, 4, replace=False) for _ in range(500)])
    val = rng.random((500, 4)).astype(np.float32) + 0.1
    build_bundle_from_codes(tmp_path / "b", [(idx, val / np.linalg.norm(val, axis=1, keepdims=True))], 500, 4, 32,
                            stream="x", progress=False)  # fmt: skip
    model = SparcModel(SparcConfig(streams={"x": 8, "y": 8}, n_latents=32, k=4))
    g = Searcher(tmp_path / "b", model=model)
    assert isinstance(g, Gallery)
    info = g.info()
    assert (info.n_items, info.shards, info.dense, info.seismic, info.backend) == (500, 1, False, False, "bundle")
    assert info.paths == ("sparse", "approx")
    q = SparseCode(torch.from_numpy(idx[:7].astype(np.int64)), torch.from_numpy(val[:7]), 32)
    for path, extra in (("sparse", {}), ("approx", {"budget": 1.0, "candidates": 500})):
        a = g.search(q, SearchParams.create(top_k=5, path=path, **extra))
        b = g.search(q, top_k=5, path=path, **extra)
        assert a.ids == b.ids and a.scores == b.scores and a.path == path
        assert [ids[0] for ids in a.ids] == list(range(7))  # each query is an item: itself first


def test_merge_over_galleries_ranks_by_score_and_keeps_ties_in_gallery_order():
    a = SearchResult(ids=[["a1", "a2"], ["a3"]], scores=[[0.9, 0.5], [0.4]], path="sparse")
    b = SearchResult(ids=[["b1", "b2"], []], scores=[[0.7, 0.5], []], path="sparse")
    merged = merge_galleries({"A": a, "B": b}, top_k=3)
    assert merged == [[(0.9, "A", "a1"), (0.7, "B", "b1"), (0.5, "A", "a2")], [(0.4, "A", "a3")]]


def test_each_refusal_of_the_engine_has_its_status_code_named_in_the_server_alone():
    from service import errors
    from service.wire import status_of

    want = {
        errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT, errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED, errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
        errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    }  # fmt: skip
    for cls, status in want.items():
        e = cls("why")
        assert status_of(e) == status and status_of(e.prefixed("requests[3]: ")) == status
        assert e.prefixed("requests[3]: ").message == "requests[3]: why"
    assert status_of(errors.ServiceError("RESOURCE_EXHAUSTED", "busy")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(errors.ServiceError("nothing more")) == grpc.StatusCode.INTERNAL
    source = open(errors.__file__).read() + open(errors.__file__.replace("errors.py", "engine.py")).read()
    assert not [c.name for c in grpc.StatusCode if c.name in source and c.name not in ("OK",)]


def test_the_search_command_names_a_bad_parameter_in_one_line(trained_checkpoint, medium_synth, tmp_path, capsys):
    from index import build_bundle
    from sparc_core.cli import main

    build_bundle(trained_checkpoint, "dino", medium_synth / "eval" / "dino.npy", tmp_path / "b", progress=False, dense=False)
    np.save(tmp_path / "q.npy", np.load(medium_synth / "eval" / "clip_txt.npy")[:3])
    base = ["index", "search", "--bundle", str(tmp_path / "b"), "--stream", "clip_txt", "--queries", str(tmp_path / "q.npy")]
    assert main([*base, "--path", "approx", "--budget", "1.5"]) == 2
    assert "budget must be in (0, 1], got 1.5" in capsys.readouterr().err
    assert main([*base, "--path", "approx", "--budget", "1.0", "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(len(json.loads(x)["hits"]) == 4 for x in lines)
