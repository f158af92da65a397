"""What a hostile or careless client, a half-configured deployment and an on-call engineer would try:
idle streams, floods of wrong tokens, huge requests, expired deadlines, half-configured TLS."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest

from index import build_bundle
from service.chaos import stop_during
from service.client import SparcClient, make_query, search_request
from service.engine import ServiceError
from service.server import SparcServer
from service.settings import load_settings
from service.wire import pb
from sparc_core import ConfigError

TOKEN = "s3cret-token"


def _settings(checkpoint, bundles, **extra):
    base = {"checkpoint": str(checkpoint), "indexes": bundles, "port": 0, "metrics_port": 0}
    return load_settings(overrides=base | extra, environ={})


@pytest.fixture(scope="module")
def bundles(trained_checkpoint, medium_synth, tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("hard-bundles")
    build_bundle(trained_checkpoint, "dino", medium_synth / "eval" / "dino.npy", root / "dino", progress=False)
    return {"dino": [str(root / "dino")]}


@pytest.fixture(scope="module")
def queries(medium_synth) -> np.ndarray:
    return np.load(medium_synth / "eval" / "clip_txt.npy")


def _req(q, **kw):
    return search_request(make_query(stream="clip_txt", vector=q), kw.pop("indexes", ["dino"]), **kw)


def _count(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


# ---- streams and workers -------------------------------------------------------------------------
def test_idle_streams_cannot_starve_other_clients(trained_checkpoint, bundles, queries):
    """64 idle SearchStream calls from one client: most are refused at once, the rest hold a bounded
    number of workers, and another client's Search still answers within 100 ms."""
    from service.chaos import IdleStreams

    srv = SparcServer(_settings(trained_checkpoint, bundles, workers=16)).start()
    target = f"127.0.0.1:{srv.port}"
    hog = IdleStreams(target, 64, timeout=30)
    try:
        expected = 64 - srv.settings.stream_limit
        assert hog.wait_refused(expected) == expected  # stream_limit (4) stay open, the rest refused
        assert set(hog.refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        with SparcClient(target) as other:
            other.health()  # the connection is up
            times = []
            for q in queries[:20]:
                t0 = time.perf_counter()
                assert other.search(_req(q), timeout=5).hits
                times.append(time.perf_counter() - t0)
        assert float(np.median(times)) < 0.1, times
        assert srv.metrics.open_streams._value.get() == srv.settings.stream_limit
        hog.close()
        deadline = time.monotonic() + 5
        while srv.metrics.open_streams._value.get() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.metrics.open_streams._value.get() == 0  # every slot is given back when the streams end
    finally:
        hog.close()
        srv.stop(0)


def test_an_idle_stream_is_closed_after_stream_idle_seconds(trained_checkpoint, bundles, queries):
    srv = SparcServer(_settings(trained_checkpoint, bundles, stream_idle_seconds=0.5)).start()
    stop = threading.Event()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}") as c:

            def requests():
                yield _req(queries[0])
                stop.wait(20)  # then nothing

            t0 = time.perf_counter()
            got = []
            with pytest.raises(grpc.RpcError) as e:
                for r in c.search_stream(requests(), timeout=20):
                    got.append(r)
            elapsed = time.perf_counter() - t0
        assert len(got) == 1 and got[0].hits  # the first request was answered
        assert e.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        assert 0.4 < elapsed < 5, elapsed
    finally:
        stop.set()
        srv.stop(0)


def test_overload_is_refused_fast_with_resource_exhausted(trained_checkpoint, bundles, queries, monkeypatch):
    from service.engine import Engine

    orig = Engine.search
    release = threading.Event()

    def blocked(self, specs, should_stop=None):
        release.wait(10)
        return orig(self, specs, should_stop)

    monkeypatch.setattr(Engine, "search", blocked)
    srv = SparcServer(_settings(trained_checkpoint, bundles, workers=4, max_in_flight=2)).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}", retries=1) as c:  # the server refusal itself, not retried
            busy = [threading.Thread(target=lambda: c.search(_req(queries[0]), timeout=15)) for _ in range(2)]
            for t in busy:
                t.start()
            time.sleep(0.3)
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as e:
                c.search(_req(queries[1]), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.perf_counter() - t0 < 0.5
            release.set()
            for t in busy:
                t.join()
    finally:
        release.set()
        srv.stop(0)


# ---- deadlines and cancellation reach the work ------------------------------------------------------
def _busy_postings(monkeypatch, seconds_per_query: float):
    import index.postings as postings

    orig = postings._search_kernel

    def busy(q_lat, q_w, q_len, q0, q1, *rest):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds_per_query * (q1 - q0):  # CPU work, as a large gallery gives
            pass
        return orig(q_lat, q_w, q_len, q0, q1, *rest)

    monkeypatch.setattr(postings, "_search_kernel", busy)
    monkeypatch.setattr(postings, "PIECE_POSTINGS", 1)  # a piece per query, as on a large gallery


def test_an_expired_deadline_stops_the_work_within_100ms(trained_checkpoint, bundles, queries, monkeypatch):
    _busy_postings(monkeypatch, 0.005)  # 300 queries: 1.5 s of work
    srv = SparcServer(_settings(trained_checkpoint, bundles)).start()
    try:
        before = _count(srv.metrics.requests, "SearchBatch", "DEADLINE_EXCEEDED")
        ok_before = _count(srv.metrics.requests, "SearchBatch", "OK")
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            c.health()
            with pytest.raises(grpc.RpcError) as e:
                c.search_batch([_req(q) for q in queries[:300]], timeout=0.2)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.1)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            time.sleep(0.4)
            cpu = time.process_time() - cpu0
        assert cpu < 0.1 * (time.perf_counter() - wall0) + 0.05, cpu  # the server is idle again
        deadline = time.monotonic() + 3
        while _count(srv.metrics.requests, "SearchBatch", "DEADLINE_EXCEEDED") == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _count(srv.metrics.requests, "SearchBatch", "DEADLINE_EXCEEDED") == before + 1  # what the client saw
        assert _count(srv.metrics.requests, "SearchBatch", "OK") == ok_before
    finally:
        srv.stop(0)


def test_shutdown_stops_in_flight_work_at_the_grace_period(trained_checkpoint, bundles, queries, monkeypatch):
    _busy_postings(monkeypatch, 0.01)  # 500 queries: 5 s of work
    srv = SparcServer(_settings(trained_checkpoint, bundles, grace_seconds=0.3)).start()
    with SparcClient(f"127.0.0.1:{srv.port}") as c:
        c.health()
        stopped, errors = stop_during(srv, lambda: c.search_batch([_req(q) for q in queries[:500]], timeout=30), 0.3, 10)
    assert stopped < 1.5, stopped  # grace 0.3 s, then the work stops
    assert errors and errors[0] != grpc.StatusCode.OK
    assert _count(srv.metrics.requests, "SearchBatch", "OK") == 0


# ---- bounded work per request -----------------------------------------------------------------------
def test_a_call_over_budget_is_refused_before_any_work(trained_checkpoint, bundles, queries):
    s = _settings(trained_checkpoint, bundles, max_batch=1024, max_top_k=1000, max_message_bytes=8 * 2**20)
    srv = SparcServer(s).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            reqs = [_req(queries[i % len(queries)], top_k=1000, explain=True) for i in range(1024)]
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as e:
                c.search_batch(reqs, timeout=30)
            assert time.perf_counter() - t0 < 2.0
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "exceeds max_hits_per_call" in e.value.details()
            # within the hit budget but a reply over max_message_bytes is refused up front too
            reqs = [_req(queries[i], top_k=1000) for i in range(150)]
            with pytest.raises(grpc.RpcError) as e:
                c.search_batch(reqs, timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in e.value.details()
            assert srv.health.Check is not None and c.health() == "SERVING"
    finally:
        srv.stop(0)


def test_retries_cannot_amplify_a_sustained_refusal(trained_checkpoint, bundles, queries, monkeypatch):
    """40 callers, each with its own client (the defaults: retries on), against a server that refuses every
    search as busy: the process's retry throttle keeps the attempts the server sees within 1.1x the calls."""
    from service.errors import ResourceExhausted

    srv = SparcServer(_settings(trained_checkpoint, bundles)).start()
    seen = []

    def busy(specs, should_stop=None):
        seen.append(1)
        raise ResourceExhausted("server busy: retry with backoff")

    monkeypatch.setattr(srv.engine, "search", busy)
    codes = []
    try:

        def caller(i: int) -> None:
            with SparcClient(f"127.0.0.1:{srv.port}") as c:
                try:
                    c.search(_req(queries[i]), timeout=10)
                except grpc.RpcError as e:
                    codes.append(e.code())

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.stop(0)
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 40
    assert 40 <= len(seen) <= 44, f"{len(seen)} attempts reached the server for 40 calls"


def test_a_call_over_a_fixed_limit_reaches_the_server_once(trained_checkpoint, bundles, queries):
    """A SearchBatch over max_batch, or over the hit budget, can never pass: it is answered with gRPC's
    do-not-retry push-back, so the client's retry policy sends it once."""
    srv = SparcServer(_settings(trained_checkpoint, bundles, max_batch=8, max_hits_per_call=100)).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}") as c:
            for reqs, why in (
                ([_req(q) for q in queries[:9]], "max_batch"),
                ([_req(q, top_k=50) for q in queries[:3]], "max_hits"),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    c.search_batch(reqs, timeout=10)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and why in e.value.details()
            assert _count(srv.metrics.requests, "SearchBatch", "RESOURCE_EXHAUSTED") == 2  # once each
    finally:
        srv.stop(0)


@pytest.fixture(scope="module")
def client_server(trained_checkpoint, bundles):
    srv = SparcServer(_settings(trained_checkpoint, bundles, auth_token=TOKEN)).start()
    with SparcClient(f"127.0.0.1:{srv.port}", token=TOKEN) as c:
        yield c, srv
    srv.stop(0)


def test_duplicate_index_names_search_once(client_server, queries):
    c, _ = client_server
    r = c.search(_req(queries[0], indexes=["dino"] * 50, top_k=10))
    ids = [h.id for h in r.hits]
    assert len(ids) == 10 and len(set(ids)) == 10


@pytest.mark.parametrize(
    "vector_scale, boost, what",
    [(3e38, None, "max_abs_value"), (1e7, None, "max_abs_value"), (1.0, -1e30, "outside"), (1.0, 1e3, "outside")],
)
def test_absurd_numbers_are_refused(client_server, queries, vector_scale, boost, what):
    c, _ = client_server
    q = queries[1].copy()
    q[0] = np.float32(vector_scale)  # one absurd entry (3e38 fits float32; its square does not)
    req = _req(q, boost={3: boost} if boost is not None else None)
    with pytest.raises(grpc.RpcError) as e:
        c.search(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in e.value.details()
    if boost is None:  # Encode refuses the same vector instead of returning inf/NaN
        with pytest.raises(grpc.RpcError) as e:
            c.stub.Encode(pb.EncodeRequest(query=make_query(stream="clip_txt", vector=q)), metadata=c.metadata)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---- authentication -----------------------------------------------------------------------------------
def test_auth_scheme_is_case_insensitive_and_failures_are_counted_and_rate_logged(client_server, queries, caplog):
    c, srv = client_server
    target = f"127.0.0.1:{srv.port}"
    lower = SparcClient(target)
    lower.metadata = (("authorization", f"bearer {TOKEN}"),)
    with lower:
        assert lower.search(_req(queries[0])).hits
    before = _count(srv.metrics.auth_failures, "Search")
    caplog.set_level(logging.WARNING, logger="sparc.service")
    with SparcClient(target, token="wrong") as bad:
        for _ in range(300):
            with pytest.raises(grpc.RpcError) as e:
                bad.search(_req(queries[0]))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _count(srv.metrics.auth_failures, "Search") == before + 300
    refusals = [r for r in caplog.records if "auth_refused" in r.getMessage()]
    assert 1 <= len(refusals) <= 2  # logged, but not 300 times


def test_calls_without_a_token_whose_body_never_arrives_cannot_lock_anyone_out(trained_checkpoint, bundles, queries):
    """12 unary calls with no token whose request body never comes (8 workers): each is refused at once,
    and the authenticated Search and the health check still answer."""
    from service.chaos import SilentBodies

    srv = SparcServer(_settings(trained_checkpoint, bundles, workers=8, auth_token=TOKEN)).start()
    target = f"127.0.0.1:{srv.port}"
    hogs = SilentBodies(target, 12)
    try:
        assert hogs.wait(12) == 12 and set(hogs.codes) == {grpc.StatusCode.UNAUTHENTICATED}
        with SparcClient(target, token=TOKEN) as c:
            assert c.health() == "SERVING"
            assert c.search(_req(queries[0]), timeout=5).hits
    finally:
        hogs.close()
        srv.stop(0)


def test_a_request_that_never_arrives_is_timed_out(trained_checkpoint, bundles, queries):
    """Authenticated calls whose body never comes hold a worker for request_wait_seconds at most."""
    from service.chaos import SilentBodies

    srv = SparcServer(_settings(trained_checkpoint, bundles, workers=8, auth_token=TOKEN, request_wait_seconds=0.5)).start()
    target = f"127.0.0.1:{srv.port}"
    hogs = SilentBodies(target, 8, metadata=(("authorization", f"Bearer {TOKEN}"),))
    try:
        t0 = time.monotonic()
        assert hogs.wait(8, timeout=10) == 8
        assert time.monotonic() - t0 < 3
        assert set(hogs.codes) == {grpc.StatusCode.CANCELLED} or set(hogs.codes) <= {
            grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
        with SparcClient(target, token=TOKEN) as c:
            assert c.search(_req(queries[0]), timeout=5).hits
            assert list(c.search_stream([_req(q) for q in queries[:3]], timeout=5))  # streams still read requests
    finally:
        hogs.close()
        srv.stop(0)


def test_health_watch_streams_do_not_take_the_search_stream_slots(trained_checkpoint, bundles, queries):
    from service.chaos import HealthWatchers

    srv = SparcServer(_settings(trained_checkpoint, bundles, workers=16, auth_token=TOKEN)).start()
    target = f"127.0.0.1:{srv.port}"
    watchers = HealthWatchers(target, 6)
    try:
        served = [s for s in watchers.first if not isinstance(s, grpc.StatusCode)]
        assert len(served) == srv.settings.health_watch_limit == 2  # a small cap of their own (16 // 8)
        assert watchers.first.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, watchers.first
        with SparcClient(target, token=TOKEN) as c:
            out = list(c.search_stream([_req(q) for q in queries[:3]], timeout=5))
            assert len(out) == 3 and all(r.hits for r in out)
    finally:
        watchers.close()
        srv.stop(0)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_with_few_workers_a_health_watch_never_locks_out_unary_calls(trained_checkpoint, bundles, queries, workers):
    """The derived stream and watch caps always leave unary calls a worker: one unauthenticated health Watch
    held open on a 1-, 2- or 3-worker server, and an authenticated Search still answers."""
    from service.chaos import HealthWatchers

    srv = SparcServer(_settings(trained_checkpoint, bundles, workers=workers, auth_token=TOKEN)).start()
    target = f"127.0.0.1:{srv.port}"
    assert srv.settings.stream_limit + srv.settings.health_watch_limit < workers
    watchers = HealthWatchers(target, 1)
    try:
        with SparcClient(target, token=TOKEN, retries=1) as c:
            for q in queries[:3]:
                assert c.search(_req(q), timeout=5).hits
            assert c.health(timeout=5) == "SERVING"  # the unary Check answers even where Watch is capped at 0
    finally:
        watchers.close()
        srv.stop(0)


def test_caps_that_leave_unary_calls_no_worker_are_refused_at_start(trained_checkpoint, bundles):
    for caps in ({"workers": 4, "max_streams": 2, "max_health_watches": 2},
                 {"workers": 2, "max_streams": 1, "max_health_watches": 1}, {"workers": 1, "max_health_watches": 1}):  # fmt: skip
        with pytest.raises((ConfigError, ValueError), match=r"must be below workers"):
            _settings(trained_checkpoint, bundles, **caps)


def test_random_method_paths_are_one_metric_label(client_server):
    from prometheus_client import generate_latest

    from service.wire import method_label

    assert method_label("/sparc.v1.SparcService/Search") == method_label("/sparc.v1.Sparc/Search") == "Search"
    assert method_label("/grpc.health.v1.Health/Watch") == "Watch"
    assert method_label("/sparc.v1.Sparc/Nope") == method_label("/a.B/C") == method_label("garbage") == "unknown"
    _, srv = client_server
    before = _count(srv.metrics.auth_failures, "unknown")
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        for i in range(50):
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary(f"/svc{i}.Random/Method{i}")(b"", timeout=5)
            assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)
    assert _count(srv.metrics.auth_failures, "unknown") == before + 50
    text = generate_latest(srv.metrics.registry).decode()
    assert "Method1" not in text and "Random" not in text


def test_reflection_is_behind_the_token_and_can_be_turned_off(client_server, trained_checkpoint, bundles):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, srv = client_server
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.ServerReflectionInfo(iter([req]), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        meta = (("authorization", f"Bearer {TOKEN}"),)
        assert next(stub.ServerReflectionInfo(iter([req]), timeout=5, metadata=meta)).list_services_response.service
    off = SparcServer(_settings(trained_checkpoint, bundles, reflection=False)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{off.port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                next(stub.ServerReflectionInfo(iter([req]), timeout=5))
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        off.stop(0)


def test_token_from_a_file_never_from_argv(trained_checkpoint, bundles, queries, tmp_path):
    from sparc_core.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--token", "x"])
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    srv = SparcServer(_settings(trained_checkpoint, bundles, auth_token_file=str(f))).start()
    try:
        with SparcClient(f"127.0.0.1:{srv.port}", token=TOKEN) as ok, SparcClient(f"127.0.0.1:{srv.port}") as anon:
            assert ok.search(_req(queries[0])).hits
            with pytest.raises(grpc.RpcError) as e:
                anon.search(_req(queries[0]))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop(0)
    env = load_settings(overrides={"checkpoint": str(trained_checkpoint)}, environ={"SPARC_AUTH_TOKEN": TOKEN + "\n"})
    assert env.token() == TOKEN  # a trailing newline (an env file, a secret mount) does not lock clients out
    with pytest.raises(ConfigError, match="auth_token_file .*: unreadable"):
        SparcServer(_settings(trained_checkpoint, bundles, auth_token_file=str(tmp_path / "missing")))


# ---- TLS fails closed ---------------------------------------------------------------------------------
def _cert(tmp_path, name: str, ca: tuple | None = None):
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
    args += ["-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(args, check=True, capture_output=True)
    return key, cert


def test_half_configured_tls_refuses_to_start(trained_checkpoint, bundles, tmp_path):
    for half in ({"tls_cert": "cert.pem"}, {"tls_key": "key.pem"}):
        with pytest.raises(ConfigError, match="TLS needs both"):
            _settings(trained_checkpoint, bundles, **half)
    with pytest.raises(ConfigError, match="TLS needs both"):  # the environment too
        load_settings(environ={"SPARC_TLS_CERT": "cert.pem"})
    from sparc_core.cli import main

    cfg = tmp_path / "service.yaml"
    cfg.write_text(f"checkpoint: {trained_checkpoint}\ntls_cert: {tmp_path / 'cert.pem'}\n")
    assert main(["serve", "--config", str(cfg)]) == 2


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make test certificates")
def test_swapped_or_unreadable_tls_files_and_mtls(trained_checkpoint, bundles, queries, tmp_path):
    key, cert = _cert(tmp_path, "server")
    for kw, msg in (
        ({"tls_cert": str(key), "tls_key": str(cert)}, "no PEM 'CERTIFICATE' block"),
        ({"tls_cert": str(cert), "tls_key": str(tmp_path / "nope.key")}, "tls_key .*: unreadable"),
    ):
        with pytest.raises(ServiceError, match=msg):
            SparcServer(_settings(trained_checkpoint, bundles, **kw))
    other_key, _ = _cert(tmp_path, "other")
    with pytest.raises(ServiceError, match="do not form a usable pair"):
        SparcServer(_settings(trained_checkpoint, bundles, tls_cert=str(cert), tls_key=str(other_key)))
    # mTLS: a client without a certificate signed by tls_client_ca is refused
    ckey, ccert = _cert(tmp_path, "client")
    s = _settings(trained_checkpoint, bundles, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(ccert))
    srv = SparcServer(s).start()
    try:
        target = f"localhost:{srv.port}"
        with SparcClient(target, root_certificates=cert.read_bytes()) as anon, pytest.raises(grpc.RpcError):
            anon.search(_req(queries[0]), timeout=5)
        with SparcClient(
            target, root_certificates=cert.read_bytes(), client_key=ckey.read_bytes(), client_cert=ccert.read_bytes()
        ) as ok:
            assert ok.search(_req(queries[0]), timeout=5).hits
    finally:
        srv.stop(0)


def test_a_stream_reads_ahead_a_bounded_number_of_bytes():
    """SearchStream's read-ahead holds at most max_stream_buffer_bytes (one oversized request alone)."""
    import queue

    from service.interceptors import ByteBoundedQueue

    q = ByteBoundedQueue(max_items=100, max_bytes=1000)
    assert q.put("a", 600) and q.buffered_bytes == 600
    put_b = threading.Thread(target=lambda: q.put("b", 600))
    put_b.start()
    put_b.join(0.5)
    assert put_b.is_alive() and q.buffered_bytes == 600  # 1,200 bytes would exceed the bound: the reader waits
    assert q.get() == "a"
    put_b.join(2)
    assert not put_b.is_alive() and q.buffered_bytes == 600
    assert q.get() == "b" and q.put("huge", 5000) and q.buffered_bytes == 5000  # alone, one large request passes
    assert not q.put("c", 10, keep_waiting=lambda: False)  # the stream ended while the reader waited: dropped
    assert q.get() == "huge"
    with pytest.raises(queue.Empty):
        q.get_nowait()
    q.close()
    assert q.get(timeout=1) is None


def test_the_health_probe_follows_the_configured_port_and_tls(trained_checkpoint, bundles, tmp_path):
    from service.healthcheck import probe

    key, cert = _cert(tmp_path, "server")
    srv = SparcServer(_settings(trained_checkpoint, bundles, tls_cert=str(cert), tls_key=str(key))).start()
    env = {"SPARC_HOST": "0.0.0.0", "SPARC_PORT": str(srv.port), "SPARC_CHECKPOINT": str(trained_checkpoint)}
    tls = env | {"SPARC_TLS_CERT": str(cert), "SPARC_TLS_KEY": str(key)}
    try:
        assert probe(tls)  # TLS, the server's own certificate trusted, on the configured port
        assert not probe(env)  # plaintext against a TLS server: not healthy
        assert not probe(tls | {"SPARC_PORT": str(srv.port + 1 if srv.port < 65535 else srv.port - 1)})
        cfg = tmp_path / "service.json"
        cfg.write_text(json.dumps({"port": srv.port, "tls_cert": str(cert), "tls_key": str(key)}))
        assert probe({"SPARC_CONFIG": str(cfg), "SPARC_CHECKPOINT": str(trained_checkpoint)})  # from the settings file
    finally:
        srv.stop(0)
