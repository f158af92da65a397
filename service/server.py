"""The gRPC server: the Sparc service, health, reflection, auth, metrics, graceful shutdown.

This module is the one place where errors become gRPC status codes.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sparc_core import SparcError

from .engine import Engine, SearchSpec, ServiceError
from .protogen import ensure_stubs
from .settings import ServiceSettings

ensure_stubs()
from ._proto.sparc.v1 import sparc_pb2 as pb  # noqa: E402
from ._proto.sparc.v1 import sparc_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Sparc"].full_name
PATHS = {pb.SEARCH_PATH_DEFAULT: None, pb.SEARCH_PATH_SPARSE: "sparse", pb.SEARCH_PATH_DENSE: "dense"}
log = logging.getLogger("sparc.service")


class Metrics:
    """Prometheus metrics in a registry of the server's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sparc_requests_total", "RPCs by method and status", ["method", "code"], registry=self.registry)
        self.latency = Histogram(
            "sparc_request_seconds",
            "RPC latency by method",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.query_l0 = Histogram(
            "sparc_query_l0", "active latents per query code", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.index_items = Gauge("sparc_index_items", "items per index", ["index"], registry=self.registry)


def _code_pb(code: Any, row: int = 0) -> pb.SparseCode:
    vals = code.values[row]
    keep = vals > 0
    return pb.SparseCode(indices=code.indices[row][keep].tolist(), values=vals[keep].tolist())


class SparcServicer(pb_grpc.SparcServicer):
    """Maps protobuf messages to Engine calls and ServiceErrors to status codes."""

    def __init__(self, engine: Engine | None, metrics: Metrics, max_in_flight: int) -> None:
        self.engine: Engine = engine  # type: ignore[assignment]  # set once loading finishes
        self.metrics = metrics
        self._slots = threading.BoundedSemaphore(max_in_flight)

    # ---- plumbing ---------------------------------------------------------------------------------
    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        code = "OK"
        if not self._slots.acquire(blocking=False):
            code = "RESOURCE_EXHAUSTED"
            self._finish(method, code, t0, context)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: too many calls in flight; retry with backoff")
        try:
            if self.engine is None:
                raise ServiceError("UNAVAILABLE", "the server is still loading its checkpoint and indexes")
            self._check_deadline(context)
            return fn()
        except ServiceError as e:
            code = e.code
            context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except SparcError as e:
            code = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 - nothing a client sends may crash the server
            code = "INTERNAL"
            log.exception("unhandled error in %s", method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        finally:
            self._slots.release()
            self._finish(method, code, t0, context)

    def _finish(self, method: str, code: str, t0: float, context: grpc.ServicerContext) -> None:
        dt = time.perf_counter() - t0
        self.metrics.requests.labels(method, code).inc()
        self.metrics.latency.labels(method).observe(dt)
        log.info(json.dumps({"method": method, "code": code, "ms": round(dt * 1e3, 3), "peer": context.peer()}))

    @staticmethod
    def _check_deadline(context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise ServiceError("DEADLINE_EXCEEDED", "deadline passed before the call started")

    def _query(self, q: pb.Query):
        kind = q.WhichOneof("kind")
        if kind == "vector":
            return self.engine.query_spec(
                "vector", stream=q.vector.stream, values=list(q.vector.values), encoder_stream=q.encoder_stream
            )
        return self.engine.query_spec(kind, text=q.text, image=q.image, encoder_stream=q.encoder_stream)

    def _spec(self, r: pb.SearchRequest) -> SearchSpec:
        if not r.HasField("query"):
            raise ServiceError("INVALID_ARGUMENT", "empty query: set exactly one of text, image or vector")
        if r.path not in PATHS:
            raise ServiceError("INVALID_ARGUMENT", f"unknown search path {r.path}")
        return SearchSpec(
            query=self._query(r.query),
            indexes=list(r.indexes),
            top_k=r.top_k or 10,
            path=PATHS[r.path] or self.engine.settings.default_path,
            require=sorted(set(r.filter.require)),
            exclude=sorted(set(r.filter.exclude)),
            boost=dict(r.filter.boost),
            explain=r.explain,
            return_code=r.return_code,
            nprobe=r.nprobe or None,
        )

    def _responses(self, specs: list[SearchSpec], context: grpc.ServicerContext) -> list[pb.SearchResponse]:
        out = []
        results = self.engine.search(specs)
        self._check_deadline(context)
        for spec, (code, hits) in zip(specs, results):
            self.metrics.query_l0.observe(int((code.values > 0).sum()))
            resp = pb.SearchResponse(path=spec.path, query_stream=spec.query.stream)
            for h in hits:
                resp.hits.add(
                    id=str(h.id),
                    score=h.score,
                    rank=h.rank,
                    index=h.index,
                    explanation=[
                        pb.SharedLatent(
                            latent=e.latent, query_value=e.query_value, item_value=e.item_value, contribution=e.contribution
                        )
                        for e in h.explanation
                    ],
                )
            if spec.return_code:
                resp.query_code.CopyFrom(_code_pb(code))
            out.append(resp)
        return out

    # ---- RPCs -------------------------------------------------------------------------------------
    def Search(self, request, context):
        return self._call("Search", context, lambda: self._responses([self._spec(request)], context)[0])

    def SearchBatch(self, request, context):
        def run():
            n = len(request.requests)
            if n == 0:
                raise ServiceError("INVALID_ARGUMENT", "SearchBatch with no requests")
            if n > self.engine.settings.max_batch:
                raise ServiceError(
                    "RESOURCE_EXHAUSTED", f"batch of {n} queries exceeds max_batch {self.engine.settings.max_batch}"
                )
            specs = []
            for i, r in enumerate(request.requests):
                try:
                    specs.append(self._spec(r))
                except ServiceError as e:
                    raise ServiceError(e.code, f"requests[{i}]: {e.message}") from None
            return pb.SearchBatchResponse(responses=self._responses(specs, context))

        return self._call("SearchBatch", context, run)

    def SearchStream(self, request_iterator: Iterator[pb.SearchRequest], context) -> Iterator[pb.SearchResponse]:
        # Requests are taken in groups (whatever has arrived, up to max_batch) so a streaming client
        # gets batched encoding and index calls; responses keep the request order.
        max_batch = self.engine.settings.max_batch if self.engine is not None else 1
        pending: queue.Queue = queue.Queue(maxsize=2 * max_batch)

        def read() -> None:
            try:
                for r in request_iterator:
                    pending.put(r)
            except Exception:  # noqa: BLE001 - the client went away; end the stream
                pass
            finally:
                pending.put(None)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        finished = False
        while not finished:
            first = pending.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < max_batch:
                try:
                    r = pending.get_nowait()
                except queue.Empty:
                    break
                if r is None:
                    finished = True
                    break
                batch.append(r)
            yield from self._call("SearchStream", context, lambda b=batch: self._responses([self._spec(r) for r in b], context))

    def Encode(self, request, context):
        def run():
            if not request.HasField("query"):
                raise ServiceError("INVALID_ARGUMENT", "empty query: set exactly one of text, image or vector")
            spec = self._query(request.query)
            code = self.engine.encode([spec])[0]
            resp = pb.EncodeResponse(code=_code_pb(code), stream=spec.stream)
            if request.decode_stream:
                decoded = self.engine.decode(code, request.decode_stream)[0]
                resp.decoded.CopyFrom(pb.Vector(stream=request.decode_stream, values=decoded.tolist()))
            return resp

        return self._call("Encode", context, run)

    def _info(self, name: str) -> pb.IndexInfo:
        s = self.engine.searchers[name]
        m = s.manifest
        return pb.IndexInfo(
            name=name,
            stream=m.stream,
            n_items=s.n_items,
            shards=len(s.shards),
            checkpoint_sha256=m.checkpoint_sha256,
            manifest_json=m.model_dump_json(),
            dense=all(d is not None for d in s.dense),
        )

    def ListIndexes(self, request, context):
        return self._call(
            "ListIndexes", context, lambda: pb.ListIndexesResponse(indexes=[self._info(n) for n in sorted(self.engine.searchers)])
        )

    def GetIndex(self, request, context):
        def run():
            if request.name not in self.engine.searchers:
                raise ServiceError(
                    "NOT_FOUND", f"unknown index {request.name!r}; this server has {sorted(self.engine.searchers)}"
                )
            return self._info(request.name)

        return self._call("GetIndex", context, run)

    def GetLatent(self, request, context):
        def run():
            n_active, items = self.engine.latent_top_items(request.latent, request.index, request.top_k or 10)
            return pb.GetLatentResponse(
                latent=request.latent,
                index=request.index,
                n_active=n_active,
                items=[pb.LatentItem(id=str(i), value=v) for i, v in items],
            )

        return self._call("GetLatent", context, run)


class BearerAuth(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(lambda it, ctx: deny(None, ctx))

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith("/grpc.health.v1.") or method.startswith("/grpc.reflection."):
            return continuation(handler_call_details)
        meta = dict(handler_call_details.invocation_metadata or ())
        import hmac

        if hmac.compare_digest(meta.get("authorization", ""), self._expected):
            return continuation(handler_call_details)
        return self._deny_stream if method.endswith("/SearchStream") else self._deny


class SparcServer:
    """A running service: gRPC server, health, metrics endpoint."""

    def __init__(self, settings: ServiceSettings) -> None:
        from concurrent import futures

        self.settings = settings
        self.health = health.HealthServicer()
        self.metrics = Metrics()
        interceptors = [BearerAuth(settings.auth_token)] if settings.auth_token else []
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=settings.max_in_flight * 2,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{settings.host}:{settings.port}"
        if settings.tls_cert and settings.tls_key:
            with open(settings.tls_cert, "rb") as c, open(settings.tls_key, "rb") as k:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ServiceError("UNAVAILABLE", f"cannot listen on {address}")
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.servicer = SparcServicer(None, self.metrics, settings.max_in_flight)
        pb_grpc.add_SparcServicer_to_server(self.servicer, self.server)
        self.engine: Engine | None = None
        self._metrics_server = None

    def start(self) -> SparcServer:
        """Start listening (health NOT_SERVING), load checkpoint and indexes, then report SERVING."""
        self.server.start()
        try:
            self.engine = Engine(self.settings)
        except BaseException:
            self.server.stop(0)
            raise
        self.servicer.engine = self.engine
        for name, s in self.engine.searchers.items():
            self.metrics.index_items.labels(name).set(s.n_items)
        if self.settings.metrics_port:
            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(json.dumps({"event": "serving", "port": self.port, "indexes": sorted(self.engine.searchers)}))
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight calls finish for ``grace`` seconds, release everything."""
        self.health.enter_graceful_shutdown()
        self.server.stop(self.settings.grace_seconds if grace is None else grace).wait()
        if self.engine is not None:
            self.engine.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    def serve_forever(self) -> None:
        """Block until SIGTERM / SIGINT, then drain in-flight calls and exit."""
        done = threading.Event()

        def on_signal(signum, frame):
            log.info(json.dumps({"event": "draining", "signal": signum}))
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        done.wait()
        self.stop()
        log.info(json.dumps({"event": "stopped"}))
