"""The gRPC service over a real channel on a loopback port: every RPC, errors, auth, health, reflection."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index import build_bundle
from service.client import SparcClient, make_query, search_request
from service.server import SparcServer
from service.settings import load_settings
from service.wire import pb

TOKEN = "s3cret-token"


def _settings(checkpoint, bundles, **extra):
    """Service settings for a test server on a free loopback port, ignoring the environment."""
    base = {"checkpoint": str(checkpoint), "indexes": bundles, "port": 0, "metrics_port": 0}
    return load_settings(overrides=base | extra, environ={})


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so the kernel cannot hand out one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def bundles(trained_checkpoint, medium_synth, tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("bundles")
    build_bundle(trained_checkpoint, "dino", medium_synth / "eval" / "dino.npy", root / "dino", progress=False)
    build_bundle(
        trained_checkpoint, "clip_img", medium_synth / "eval" / "clip_img.npy", root / "img", progress=False, dense=False
    )
    return {"dino": [str(root / "dino")], "img-sparse": [str(root / "img")]}


@pytest.fixture(scope="module")
def server(trained_checkpoint, bundles):
    s = _settings(trained_checkpoint, bundles, max_top_k=100, max_batch=64, max_text_chars=50, max_image_bytes=1000)
    srv = SparcServer(s).start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def queries(medium_synth) -> np.ndarray:
    return np.load(medium_synth / "eval" / "clip_txt.npy")


def test_health_and_index_listing(client, bundles):
    assert client.health() == "SERVING"
    assert client.health("sparc.v1.Sparc") == "SERVING"
    infos = {i.name: i for i in client.list_indexes()}
    assert set(infos) == set(bundles)
    assert infos["dino"].stream == "dino" and infos["dino"].n_items == 600 and infos["dino"].dense
    assert not infos["img-sparse"].dense
    assert client.get_index("dino").checkpoint_sha256 == infos["dino"].checkpoint_sha256
    public = json.loads(client.get_index("dino").manifest_json)  # file names only, no server paths
    assert public["source"] == "dino.npy" and not Path(public["checkpoint_path"]).is_absolute()
    with pytest.raises(grpc.RpcError) as e:
        client.get_index("nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown index 'nope'" in e.value.details()


def test_text_stream_vector_queries_find_the_paired_image(client, queries):
    found = 0
    for i in range(100):
        res = client.search_vector("clip_txt", queries[i], indexes=["dino"], top_k=5)
        assert [h.rank for h in res.hits] == [1, 2, 3, 4, 5]
        found += res.hits[0].id == str(i)
    assert found > 30  # 600 items: chance is 1/600


def test_search_explains_and_returns_code(client, queries):
    res = client.search_vector("clip_txt", queries[3], indexes=["dino"], top_k=3, explain=True, return_code=True, path="sparse")
    idx, vals = res.query_code
    assert len(idx) == len(vals) > 0 and all(v > 0 for v in vals)
    top = res.hits[0]
    assert top.explanation and sum(e.contribution for e in top.explanation) == pytest.approx(top.score, rel=1e-2)
    assert all(e.latent in idx for e in top.explanation)


def test_explanations_add_up_to_the_boosted_score_and_say_what_they_are_on_dense(client, queries):
    """With boosts (one on a latent the query has, one on a latent it lacks, one negative) every hit's
    contributions add up to its score; on the dense path the response says the explanation is the codes'
    overlap, not the score's decomposition."""
    code = client.search_vector("clip_txt", queries[4], indexes=["dino"], top_k=1, return_code=True).query_code
    plain = client.search_vector("clip_txt", queries[4], indexes=["dino"], top_k=10, explain=True, path="sparse")
    shared = [e.latent for h in plain.hits for e in h.explanation]
    boost = {code[0][0]: 0.8, min(set(range(192)) - set(code[0])): 0.5, shared[-1]: -0.3}
    req = search_request(make_query(stream="clip_txt", vector=queries[4]), ["dino"], top_k=10, explain=True,
                         path="sparse", boost=boost)  # fmt: skip
    res = client.search(req)
    assert res.explanation_basis == "score" and res.hits
    for h in res.hits:
        assert sum(e.contribution for e in h.explanation) == pytest.approx(h.score, rel=1e-3, abs=1e-4), h
    assert any(e.latent in boost for h in res.hits for e in h.explanation)
    dense = client.search(search_request(make_query(stream="clip_txt", vector=queries[4]), ["dino"], top_k=3,
                                         explain=True, path="dense"))  # fmt: skip
    assert dense.explanation_basis == "sparse_code" and dense.hits[0].explanation


def test_search_over_several_indexes_merges_by_score(client, queries):
    res = client.search_vector("clip_txt", queries[5], indexes=["dino", "img-sparse"], top_k=6, path="sparse")
    scores = [h.score for h in res.hits]
    assert scores == sorted(scores, reverse=True) and {h.index for h in res.hits} <= {"dino", "img-sparse"}
    dense_req = search_request(make_query(stream="clip_txt", vector=queries[5]), ["img-sparse"], path="dense")
    with pytest.raises(grpc.RpcError) as e:
        client.search(dense_req)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_approx_path_over_grpc(client, queries):
    for i in range(5):
        exact = client.search_vector("clip_txt", queries[i], indexes=["dino"], top_k=5, path="sparse")
        full = client.search(search_request(make_query(stream="clip_txt", vector=queries[i]), ["dino"], top_k=5,
                                            path="approx", budget=1.0, candidates=600))  # fmt: skip
        assert [h.id for h in full.hits] == [h.id for h in exact.hits]
        np.testing.assert_allclose([h.score for h in full.hits], [h.score for h in exact.hits], rtol=1e-5)
    bad = search_request(make_query(stream="clip_txt", vector=queries[0]), ["dino"], path="approx", budget=1.5)
    with pytest.raises(grpc.RpcError) as e:
        client.search(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "budget" in e.value.details()
    seismic = search_request(make_query(stream="clip_txt", vector=queries[0]), ["dino"], path="seismic")
    with pytest.raises(grpc.RpcError) as e:
        client.search(seismic)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Seismic" in e.value.details()


def test_batch_and_stream_match_single_calls(client, queries):
    reqs = [search_request(make_query(stream="clip_txt", vector=queries[i]), ["dino"], top_k=4) for i in range(20)]
    singles = [client.search(r) for r in reqs]
    batch = client.search_batch(reqs)
    stream = list(client.search_stream(reqs))
    for a, b, c in zip(singles, batch, stream):
        assert [h.id for h in a.hits] == [h.id for h in b.hits] == [h.id for h in c.hits]
        np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in c.hits], rtol=1e-5)


def test_encode_and_cross_decode(client, queries, trained_checkpoint):
    import torch

    from sparc_core import SparseCode, load_checkpoint

    r = client.encode(make_query(stream="clip_txt", vector=queries[0]), decode_stream="dino")
    model = load_checkpoint(trained_checkpoint)
    local = model.encode({"clip_txt": torch.from_numpy(queries[:1])})
    # the code is the model's own one-stream code of the query (its active latents, their values)
    active = local.values[0] > 0
    got = dict(zip(r.code.indices, r.code.values))
    want = dict(zip(local.indices[0][active].tolist(), local.values[0][active].tolist()))
    assert r.stream == "clip_txt" and set(got) == set(want)
    np.testing.assert_allclose([got[i] for i in want], list(want.values()), rtol=1e-4, atol=1e-5)
    # the cross-decoded vector is that code decoded into DINO's own feature space
    code = SparseCode(torch.tensor([r.code.indices]), torch.tensor([r.code.values]), model.n_latents)
    assert r.decoded.stream == "dino"
    np.testing.assert_allclose(r.decoded.values, model.decode(code, "dino")[0].detach().numpy(), rtol=1e-4, atol=1e-4)


def test_get_latent_concept_browser(client, queries):
    code = client.encode(make_query(stream="clip_txt", vector=queries[0])).code
    latent = code.indices[int(np.argmax(code.values))]
    r = client.get_latent(latent, "dino", top_k=5)
    assert r.n_active >= len(r.items) > 0
    vals = [i.value for i in r.items]
    assert vals == sorted(vals, reverse=True)


BAD = [
    (pb.SearchRequest(indexes=["dino"]), grpc.StatusCode.INVALID_ARGUMENT, "empty query"),
    (
        pb.SearchRequest(query=pb.Query(vector=pb.Vector(stream="clip_txt", values=[1.0] * 5)), indexes=["dino"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "takes 48 values, got 5",
    ),
    (
        pb.SearchRequest(query=pb.Query(vector=pb.Vector(stream="clip_txt", values=[float("nan")] * 48)), indexes=["dino"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    ),
    (
        pb.SearchRequest(query=pb.Query(vector=pb.Vector(stream="audio", values=[1.0] * 48)), indexes=["dino"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown stream 'audio'",
    ),
    (
        pb.SearchRequest(query=pb.Query(vector=pb.Vector(stream="clip_txt", values=[1.0] * 48)), indexes=["dino"], top_k=101),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k must be in",
    ),
    (
        pb.SearchRequest(query=pb.Query(vector=pb.Vector(stream="clip_txt", values=[1.0] * 48)), indexes=["zzz"]),
        grpc.StatusCode.NOT_FOUND,
        "unknown index 'zzz'",
    ),
    (
        pb.SearchRequest(query=pb.Query(vector=pb.Vector(stream="clip_txt", values=[1.0] * 48))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no index named",
    ),
    (
        pb.SearchRequest(query=pb.Query(text="a dog on a beach"), indexes=["dino"]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "text queries need a text encoder",
    ),
    (pb.SearchRequest(query=pb.Query(text="x" * 51), indexes=["dino"]), grpc.StatusCode.INVALID_ARGUMENT, "exceeds 50"),
    (
        pb.SearchRequest(query=pb.Query(image=b"\x89PNG" + b"\0" * 2000), indexes=["dino"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds 1000",
    ),
    (
        pb.SearchRequest(query=pb.Query(image=b"not an image"), indexes=["dino"]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "image queries need an image encoder",
    ),
    (
        pb.SearchRequest(
            query=pb.Query(vector=pb.Vector(stream="clip_txt", values=[1.0] * 48)),
            indexes=["dino"],
            filter=pb.LatentFilter(require=[10_000]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "latent 10000 is out of range",
    ),
]


@pytest.mark.parametrize("request_,code,text", BAD)
def test_bad_inputs_get_the_right_status(client, request_, code, text):
    with pytest.raises(grpc.RpcError) as e:
        client.search(request_)
    assert e.value.code() == code
    assert text in e.value.details()
    assert client.health() == "SERVING"


def test_batch_errors_name_the_request_and_limits(client, queries):
    good = search_request(make_query(stream="clip_txt", vector=queries[0]), ["dino"])
    with pytest.raises(grpc.RpcError) as e:
        client.search_batch([good, pb.SearchRequest(indexes=["dino"])])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests[1]: empty query" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.search_batch([good] * 65)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_deadline_is_honoured(client, queries):
    req = search_request(make_query(stream="clip_txt", vector=queries[0]), ["dino"])
    with pytest.raises(grpc.RpcError) as e:
        client.search(req, timeout=1e-6)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


class _ExpiredContext:
    """A server-side call context whose deadline has already passed when the servicer sees it."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None

    def time_remaining(self) -> float:
        return -0.5

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def abort(self, code, details):
        self.aborted = (code, details)
        raise grpc.RpcError(details)


def test_server_stops_a_call_whose_deadline_passed_and_counts_it(server):
    # The servicer's own deadline check, observed directly: the work never runs, the status is
    # DEADLINE_EXCEEDED and the metrics count the call under that code (what the client saw).
    servicer = server.servicer
    counter = servicer.metrics.requests.labels("Search", "DEADLINE_EXCEEDED")
    before = counter._value.get()
    ran = []
    ctx = _ExpiredContext()
    with pytest.raises(grpc.RpcError):
        servicer._call("Search", ctx, lambda: ran.append(1))
    assert ran == []
    assert ctx.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in ctx.aborted[1]
    assert counter._value.get() == before + 1


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
    assert {"sparc.v1.SparcService", "grpc.health.v1.Health"} <= names


def test_bearer_token_is_required(trained_checkpoint, bundles, queries):
    s = _settings(trained_checkpoint, bundles, auth_token=TOKEN)
    srv = SparcServer(s).start()
    try:
        target = f"127.0.0.1:{srv.port}"
        with SparcClient(target) as anon, SparcClient(target, token="wrong") as bad, SparcClient(target, token=TOKEN) as ok:
            assert anon.health() == "SERVING"  # health stays open for load balancers
            for c in (anon, bad):
                with pytest.raises(grpc.RpcError) as e:
                    c.search_vector("clip_txt", queries[0], ["dino"])
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    list(c.search_stream([search_request(make_query(stream="clip_txt", vector=queries[0]), ["dino"])]))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ok.search_vector("clip_txt", queries[0], ["dino"]).hits
    finally:
        srv.stop(0)


def test_metrics_endpoint_counts_requests(trained_checkpoint, bundles, queries):
    import urllib.request

    gport, mport = _free_ports(2)
    s = _settings(trained_checkpoint, bundles, port=gport, metrics_port=mport)
    srv = SparcServer(s).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            c.search_vector("clip_txt", queries[0], ["dino"])
            with pytest.raises(grpc.RpcError):
                c.get_index("missing")
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert 'sparc_requests_total{code="OK",method="Search"} 1.0' in text
        assert 'sparc_requests_total{code="NOT_FOUND",method="GetIndex"} 1.0' in text
        assert 'sparc_index_items{index="dino"} 600.0' in text
    finally:
        srv.stop(0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stream=st.sampled_from(["clip_txt", "dino", "", "x" * 300]),
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=80),
    indexes=st.lists(st.sampled_from(["dino", "img-sparse", "", "nope"]), max_size=3),
    top_k=st.integers(min_value=0, max_value=5000),
    path=st.integers(min_value=0, max_value=5),
    require=st.lists(st.integers(min_value=0, max_value=4000), max_size=3),
    text=st.one_of(st.none(), st.text(max_size=60)),
)
def test_fuzzed_requests_never_break_the_server(client, stream, values, indexes, top_k, path, require, text):
    q = pb.Query(text=text) if text is not None else pb.Query(vector=pb.Vector(stream=stream, values=values))
    req = pb.SearchRequest(query=q, indexes=indexes, top_k=top_k, path=path, filter=pb.LatentFilter(require=require))
    try:
        client.search(req, timeout=10)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), (
            e.code(),
            e.details(),
        )
    assert client.health() == "SERVING"


SLOW_SERVER = """
import sys, time
from service.server import SparcServer
from service.servicer import SparcServicer
from service.settings import load_settings
orig = SparcServicer._responses
def slow(self, specs, context):
    time.sleep(2.0)
    return orig(self, specs, context)
SparcServicer._responses = slow
import json
s = load_settings(overrides={"checkpoint": sys.argv[1], "indexes": json.loads(sys.argv[2]), "port": 0, "metrics_port": 0,
                             "grace_seconds": 10}, environ={})
srv = SparcServer(s).start()
print(srv.port, flush=True)
srv.serve_forever()
print("STOPPED", flush=True)
"""


def test_sigterm_drains_an_in_flight_call(trained_checkpoint, bundles, queries):
    import json
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, str(trained_checkpoint), json.dumps(bundles)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        port = int(proc.stdout.readline())
        result = {}
        with SparcClient(f"127.0.0.1:{port}") as c:
            c.wait_ready()
            t = threading.Thread(target=lambda: result.setdefault("r", c.search_vector("clip_txt", queries[0], ["dino"])))
            t.start()
            time.sleep(0.5)  # the call is in flight (the server sleeps 2 s in it)
            os.kill(proc.pid, signal.SIGTERM)
            t.join(timeout=20)
        assert result["r"].hits  # the in-flight call completed
        assert proc.wait(timeout=20) == 0
        assert "STOPPED" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_settings_file_env_and_flags_layer(tmp_path):
    cfg = tmp_path / "service.yaml"
    cfg.write_text("port: 6000\nmax_top_k: 50\nindexes:\n  a: [x]\n")
    s = load_settings(cfg, overrides={"max_top_k": 70}, environ={"SPARC_PORT": "7000", "SPARC_INDEXES": '{"b": ["y"]}'})
    assert (s.port, s.max_top_k, s.indexes) == (7000, 70, {"b": ["y"]})
    # one key of a nested setting with "__" merges into the file's; a GPU list stays a string; bad JSON is named
    cfg.write_text("encoders:\n  device: cuda\n  precision: bf16\n")
    env = {"SPARC_ENCODERS__DEVICE": "cpu", "sparc_faiss_gpus": "0,1", "SPARC_MAX_TOP_K": "33"}
    s = load_settings(cfg, environ=env)
    assert (s.encoders.device, s.encoders.precision, s.faiss_gpus, s.max_top_k) == ("cpu", "bf16", "0,1", 33)
    from sparc_core import ConfigError

    with pytest.raises(ConfigError, match='field "indexes".*holds JSON'):
        load_settings(environ={"SPARC_INDEXES": "{a: [x"})
    cfg.write_text("prot: 1\n")

    with pytest.raises(ConfigError, match="prot: unknown key"):
        load_settings(cfg, environ={})


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make a test certificate")
def test_tls(trained_checkpoint, bundles, queries, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    s = _settings(trained_checkpoint, bundles, tls_cert=str(cert), tls_key=str(key))
    srv = SparcServer(s).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}", root_certificates=cert.read_bytes()) as c:
            assert c.search_vector("clip_txt", queries[0], ["dino"]).hits
        with SparcClient(f"127.0.0.1:{srv.port}") as plain, pytest.raises(grpc.RpcError):
            plain.health(timeout=2)
    finally:
        srv.stop(0)


def test_refusals_are_retried_by_grpcs_own_retry_policy(server, medium_synth, monkeypatch):
    """RESOURCE_EXHAUSTED / UNAVAILABLE are retried with backoff by the channel's service config; other codes
    and a client with retries=1 see the refusal."""
    from service.engine import ServiceError

    q = np.load(medium_synth / "eval" / "clip_txt.npy")[0]
    req = search_request(make_query(stream="clip_txt", vector=q), ["dino"], top_k=3)
    real, calls, refuse = server.engine.search, [], [2]

    def busy_twice(specs, should_stop=None):
        calls.append(time.monotonic())
        if refuse[0] > 0:
            refuse[0] -= 1
            raise ServiceError("RESOURCE_EXHAUSTED", "busy")
        return real(specs, should_stop)

    monkeypatch.setattr(server.engine, "search", busy_twice)
    target = f"127.0.0.1:{server.port}"
    with SparcClient(target) as c:
        assert c.search(req, timeout=10).hits and len(calls) == 3  # two refusals, retried, then answered
    calls.clear()
    refuse[0] = 2
    with SparcClient(target, retries=1) as c, pytest.raises(grpc.RpcError) as e:
        c.search(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(calls) == 1
    calls.clear()
    refuse[0] = 0
    before = server.metrics.requests.labels("Search", "NOT_FOUND")._value.get()
    with SparcClient(target) as c, pytest.raises(grpc.RpcError) as e:  # not retryable: answered once
        c.search(search_request(make_query(stream="clip_txt", vector=q), ["nope"], top_k=3), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and not calls  # refused before the engine's search
    assert server.metrics.requests.labels("Search", "NOT_FOUND")._value.get() == before + 1


def test_the_asyncio_client_gives_what_the_blocking_one_gives(server, client, medium_synth):
    import asyncio

    from service.client import AsyncSparcClient
    from service.messages import SearchBatchRequest, SearchRequest  # the public message types

    qs = np.load(medium_synth / "eval" / "clip_txt.npy")[:4]
    want = [client.search_vector("clip_txt", q, ["dino"], top_k=5) for q in qs]
    assert SearchRequest is type(search_request(make_query(stream="clip_txt", vector=qs[0]), ["dino"]))
    assert SearchBatchRequest.DESCRIPTOR.full_name == "sparc.v1.SearchBatchRequest"

    async def run():
        async with AsyncSparcClient(f"127.0.0.1:{server.port}") as c:
            assert await c.health() == "SERVING"
            singles = await asyncio.gather(*(c.search_vector("clip_txt", q, ["dino"], top_k=5) for q in qs))
            batch = await c.search_batch([search_request(make_query(stream="clip_txt", vector=q), ["dino"], top_k=5) for q in qs])
            names = [i.name for i in await c.list_indexes()]
            return singles, batch, names

    singles, batch, names = asyncio.run(run())
    assert [[h.id for h in r.hits] for r in singles] == [[h.id for h in r.hits] for r in want]
    assert [[h.id for h in r.hits] for r in batch] == [[h.id for h in r.hits] for r in want]
    assert names == [i.name for i in client.list_indexes()]


def test_an_index_whose_store_is_down_is_unavailable_and_its_health_says_so(server, medium_synth, monkeypatch):
    """A gallery whose store does not answer (a Milvus server down): its calls are UNAVAILABLE (retried by the
    client), health "index/NAME" is NOT_SERVING until it answers again, the server as a whole stays SERVING."""
    from index.milvus_backend import GalleryUnavailable

    q = np.load(medium_synth / "eval" / "clip_txt.npy")[0]
    searcher = server.engine.searchers["dino"]
    real = searcher.search

    def down(*a, **kw):
        raise GalleryUnavailable("milvus://db:19530/dino: Milvus did not answer (connection refused)")

    with SparcClient(f"127.0.0.1:{server.port}", retries=1) as c:
        assert c.health("index/dino") == "SERVING"
        monkeypatch.setattr(searcher, "search", down)
        with pytest.raises(grpc.RpcError) as e:
            c.search_vector("clip_txt", q, ["dino"], top_k=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "did not answer" in e.value.details()
        assert c.health("index/dino") == "NOT_SERVING" and c.health() == "SERVING"
        assert c.health("index/img-sparse") == "SERVING"
        monkeypatch.setattr(searcher, "search", real)
        assert c.search_vector("clip_txt", q, ["dino"], top_k=3).hits
        assert c.health("index/dino") == "SERVING"
