"""The gRPC server: the Sparc service, health, reflection, auth, metrics, graceful shutdown.

This module is the one place where errors become gRPC status codes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from index import SearchParams
from index.errors import GalleryUnavailable
from sparc_core import SparcError
from sparc_core.attribution import heatmap_png, pair_png, words_png

from .deployment import fingerprint, read_deployment
from .engine import Engine, SearchSpec, SearchStopped
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OverLimit,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from .protogen import ensure_stubs
from .settings import ServiceSettings

ensure_stubs()
from ._proto.sparc.v1 import sparc_pb2 as pb  # noqa: E402
from ._proto.sparc.v1 import sparc_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SparcService"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SparcAdminService"].full_name
# The service's first name: still answered, with the message types of that time, so deployed clients keep working.
LEGACY_SERVICE_NAME = "sparc.v1.Sparc"
PATHS = {
    pb.SEARCH_PATH_UNSPECIFIED: None,
    pb.SEARCH_PATH_SPARSE: "sparse",
    pb.SEARCH_PATH_DENSE: "dense",
    pb.SEARCH_PATH_APPROX: "approx",
    pb.SEARCH_PATH_SEISMIC: "seismic",
}
HEATMAP_METHODS = {
    pb.HEATMAP_METHOD_RELEVANCE: "relevance",
    pb.HEATMAP_METHOD_GRADCAM: "gradcam",
    pb.HEATMAP_METHOD_GRAD_X_INPUT: "grad-x-input",
    pb.HEATMAP_METHOD_CLIP_RELEVANCE: "clip-relevance",
    pb.HEATMAP_METHOD_CLIP_COSINE: "clip-cosine",
}
ATTRIBUTION_METHODS = {pb.ATTRIBUTION_METHOD_GRAD: "grad", pb.ATTRIBUTION_METHOD_RELEVANCE: "relevance"}
log = logging.getLogger("sparc.service")
# The status code of each refusal the engine raises (the only place status names meet the engine's errors).
STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status of an engine refusal: its class's (or the nearest base class's), else the status code
    name it was made with."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return getattr(grpc.StatusCode, error.code or "", grpc.StatusCode.INTERNAL)


def _method(request: Any, names: dict[int, str]) -> str:
    """A request's method as the engine names it: the enum, or (older clients) the deprecated string field;
    "" for the default. Both set and disagreeing is an error, never a silent choice."""
    legacy = request.method_name
    if request.method == 0:
        return legacy
    if request.method not in names:
        raise InvalidArgument(f"unknown method enum value {request.method}")
    chosen = names[request.method]
    if legacy and legacy != chosen:
        raise InvalidArgument(f"method {chosen!r} and method_name {legacy!r} disagree; set one")
    return chosen


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
        self.index_reloads = Counter(
            "sparc_index_reloads_total",
            "new index versions swapped in (reloaded) or refused",
            ["index", "outcome"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "sparc_auth_failures_total", "calls refused for a missing or wrong token", ["method"], registry=self.registry
        )
        self.open_streams = Gauge("sparc_open_streams", "streaming calls open now", registry=self.registry)
        self.streams_refused = Counter(
            "sparc_streams_refused_total", "streaming calls refused by the stream caps", ["reason"], registry=self.registry
        )
        # what the calls cost the models, not only how many hits they asked for
        self.work = Counter(
            "sparc_work_total",
            "model work by unit: texts, text_chars, images, vectors encoded; gradient_calls run",
            ["method", "unit"],
            registry=self.registry,
        )
        self.gradient_busy = Gauge(
            "sparc_gradient_calls_busy", "Localize / AttributeText / ExplainPair calls queued or running", registry=self.registry
        )

    def count_queries(self, method: str, queries: list) -> None:
        """Add the encoding work of validated queries (engine QuerySpecs) to ``sparc_work_total``."""
        texts = [q.text for q in queries if q.text is not None]
        if texts:
            self.work.labels(method, "texts").inc(len(texts))
            self.work.labels(method, "text_chars").inc(sum(len(t) for t in texts))
        images = sum(q.pixels is not None for q in queries)
        if images:
            self.work.labels(method, "images").inc(images)
        vectors = len(queries) - len(texts) - images
        if vectors:
            self.work.labels(method, "vectors").inc(vectors)


def _code_pb(code: Any, row: int = 0) -> pb.SparseCode:
    vals = code.values[row]
    keep = vals > 0
    return pb.SparseCode(indices=code.indices[row][keep].tolist(), values=vals[keep].tolist())


GRADIENT_METHODS = ("Localize", "AttributeText", "ExplainPair")


class ByteBoundedQueue:
    """The requests a stream has read ahead: at most ``max_items`` and ``max_bytes`` (one request alone may
    exceed ``max_bytes``; grpc's message limit bounds it). ``get`` returns None once closed and drained."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: list[tuple[Any, int]] = []
        self._bytes = 0
        self._closed = False
        self._cv = threading.Condition()

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def put(self, item: Any, size: int, keep_waiting: Callable[[], bool] = lambda: True) -> bool:
        """Add ``item`` when there is room; False (not added) if ``keep_waiting()`` turns false meanwhile."""
        with self._cv:
            while self._items and (len(self._items) >= self.max_items or self._bytes + size > self.max_bytes):
                if not keep_waiting():
                    return False
                self._cv.wait(0.25)
            self._items.append((item, size))
            self._bytes += size
            self._cv.notify_all()
            return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; None once closed and empty; raises queue.Empty after ``timeout`` seconds."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._items or self._closed, timeout):
                raise queue.Empty
            if not self._items:
                return None
            item, size = self._items.pop(0)
            self._bytes -= size
            self._cv.notify_all()
            return item

    def get_nowait(self) -> Any:
        return self.get(timeout=0)


def _legacy_handler(servicer: SparcServicer) -> grpc.GenericRpcHandler:
    """Every method under the service's first name (sparc.v1.Sparc), on the same servicer: the messages are
    the same bytes on the wire except SearchStream's and GetIndex's, which keep their earlier types."""
    unary = grpc.unary_unary_rpc_method_handler
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["SparcService"].methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        if m.name == "SearchStream":
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(
                servicer.LegacySearchStream, pb.SearchRequest.FromString, pb.SearchResponse.SerializeToString
            )
        elif m.name == "GetIndex":
            handlers[m.name] = unary(servicer.LegacyGetIndex, req.FromString, pb.IndexInfo.SerializeToString)
        else:
            handlers[m.name] = unary(getattr(servicer, m.name), req.FromString, resp.SerializeToString)
    return grpc.method_handlers_generic_handler(LEGACY_SERVICE_NAME, handlers)


class SparcServicer(pb_grpc.SparcServiceServicer):
    """Maps protobuf messages to Engine calls and ServiceErrors to status codes."""

    def __init__(self, engine: Engine | None, metrics: Metrics, max_in_flight: int) -> None:
        self._engine: Engine | None = engine  # set once loading finishes; replaced whole by a new deployment
        self._local = threading.local()
        self.metrics = metrics
        self._slots = threading.BoundedSemaphore(max_in_flight)

    @property
    def engine(self) -> Engine:
        """The engine of the call running on this thread (taken once when it began: a deployment switched
        meanwhile never mixes into it), else the serving one."""
        return getattr(self._local, "engine", None) or self._engine  # type: ignore[return-value]

    @engine.setter
    def engine(self, engine: Engine | None) -> None:
        self._engine = engine

    # ---- plumbing ---------------------------------------------------------------------------------
    def _call(self, method: str, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        code = "OK"
        if not self._slots.acquire(blocking=False):
            code = "RESOURCE_EXHAUSTED"
            self._finish(method, code, t0, context)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: too many calls in flight; retry with backoff")
        engine = self._engine
        if engine is not None:
            engine.hold()
        self._local.engine = engine
        try:
            if engine is None:
                raise Unavailable("the server is still loading its checkpoint and indexes")
            self._check_deadline(context)
            try:
                out = fn()
            finally:
                if method in GRADIENT_METHODS:
                    self.metrics.gradient_busy.set(self.engine.lane.busy)
            if not context.is_active():  # the client is gone: what it saw was a deadline or a cancellation
                code = self._gone(context)
            return out
        except ServiceError as e:
            status = status_of(e)
            code = status.name
            if isinstance(e, OverLimit):  # the same call can never pass: gRPC's retry policy must not resend it
                context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))
            context.abort(status, e.message)
        except GalleryUnavailable as e:  # a Milvus server down or too slow: the client may retry
            code = "UNAVAILABLE"
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except SearchStopped:
            code = self._gone(context)
            context.abort(getattr(grpc.StatusCode, code), "the call's deadline passed or it was cancelled; its work stopped")
        except SparcError as e:
            code = "INVALID_ARGUMENT"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:  # noqa: BLE001 - nothing a client sends may crash the server
            code = "INTERNAL"
            log.exception("unhandled error in %s", method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        finally:
            self._local.engine = None
            if engine is not None:
                engine.release()
            self._slots.release()
            if method in GRADIENT_METHODS and code not in ("RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
                self.metrics.work.labels(method, "gradient_calls").inc()  # admitted to the gradient lane
            self._finish(method, code, t0, context)

    @staticmethod
    def _gone(context: grpc.ServicerContext) -> str:
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"

    @staticmethod
    def _stopper(context: grpc.ServicerContext) -> Callable[[], bool]:
        """True once the call's deadline passed, the client cancelled, or shutdown's grace ran out."""

        def should_stop() -> bool:
            if not context.is_active():
                return True
            remaining = context.time_remaining()
            return remaining is not None and remaining <= 0

        return should_stop

    def _finish(self, method: str, code: str, t0: float, context: grpc.ServicerContext) -> None:
        dt = time.perf_counter() - t0
        self.metrics.requests.labels(method, code).inc()
        self.metrics.latency.labels(method).observe(dt)
        log.info(json.dumps({"method": method, "code": code, "ms": round(dt * 1e3, 3), "peer": context.peer()}))

    @staticmethod
    def _check_deadline(context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline passed before the call started")

    def _query(self, q: pb.Query):
        kind = q.WhichOneof("kind")
        if kind == "vector":
            return self.engine.query_spec(
                "vector", stream=q.vector.stream, values=list(q.vector.values), encoder_stream=q.encoder_stream
            )
        return self.engine.query_spec(kind, text=q.text, image=q.image, encoder_stream=q.encoder_stream)

    def _specs(self, requests: Sequence[pb.SearchRequest], batch: bool = False) -> list[SearchSpec]:
        """Validated searches of a call: every request's parameters and the call's budget are checked
        before any query is decoded (an image over budget is never decoded)."""
        plans = []
        for i, r in enumerate(requests):
            try:
                plans.append(self._spec(r, query=False))
                self.engine.check_search(plans[-1])
            except ServiceError as e:
                raise e.prefixed(f"requests[{i}]: ") if batch else e from None
        self.engine.check_budget(plans)
        out = []
        for i, (r, plan) in enumerate(zip(requests, plans)):
            try:
                out.append(dataclasses.replace(plan, query=self._query(r.query)))
            except ServiceError as e:
                raise e.prefixed(f"requests[{i}]: ") if batch else e from None
        return out

    def _spec(self, r: pb.SearchRequest, query: bool = True) -> SearchSpec:
        if not r.HasField("query") or r.query.WhichOneof("kind") is None:
            raise InvalidArgument("empty query: set exactly one of text, image or vector")
        if r.path not in PATHS:
            raise InvalidArgument(f"unknown search path {r.path}")
        q = self._query(r.query) if query else None
        try:  # the one place a request's search parameters are made (and validated) from the proto
            params = SearchParams.create(
                top_k=r.top_k or 10,
                path=PATHS[r.path] or self.engine.settings.default_path,
                require=r.filter.require,
                exclude=r.filter.exclude,
                boost=dict(r.filter.boost),
                nprobe=r.nprobe or None,
                query_cut=r.query_cut or None,
                heap_factor=r.heap_factor or None,
                budget=r.budget or None,
                candidates=r.candidates or None,
            )
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        # a name given twice is searched once
        return SearchSpec(q, list(dict.fromkeys(r.indexes)), params, explain=r.explain, return_code=r.return_code)

    def _counted(self, method: str, specs: list[SearchSpec]) -> list[SearchSpec]:
        """``specs``, after adding their encoding work to ``sparc_work_total``."""
        self.metrics.count_queries(method, [s.query for s in specs])
        return specs

    def _responses(self, specs: list[SearchSpec], context: grpc.ServicerContext) -> list[pb.SearchResponse]:
        out = []
        engine = self.engine
        names = engine.names
        results = engine.search(specs, should_stop=self._stopper(context))
        self._check_deadline(context)
        for spec, (code, hits) in zip(specs, results):
            self.metrics.query_l0.observe(int((code.values > 0).sum()))
            resp = pb.SearchResponse(path=spec.path, query_stream=spec.query.stream, checkpoint_sha256=engine.checkpoint_sha256)
            if spec.explain:
                resp.explanation_basis = "sparse_code" if spec.path == "dense" else "score"
            for h in hits:
                resp.hits.add(
                    id=str(h.id),
                    score=h.score,
                    rank=h.rank,
                    index=h.index,
                    index_version=h.version,
                    explanation=[
                        pb.SharedLatent(
                            latent=e.latent,
                            query_value=e.query_value,
                            item_value=e.item_value,
                            contribution=e.contribution,
                            name=names.get(e.latent, ""),
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
        return self._call("Search", context, lambda: self._responses(self._counted("Search", self._specs([request])), context)[0])

    def SearchBatch(self, request, context):
        def run():
            n = len(request.requests)
            if n == 0:
                raise InvalidArgument("SearchBatch with no requests")
            if n > self.engine.settings.max_batch:
                raise OverLimit(f"batch of {n} queries exceeds max_batch {self.engine.settings.max_batch}")
            specs = self._specs(request.requests, batch=True)
            if self._stopper(context)():
                raise SearchStopped("stopped after validation: the deadline passed or the call was cancelled")
            return pb.SearchBatchResponse(responses=self._responses(self._counted("SearchBatch", specs), context))

        return self._call("SearchBatch", context, run)

    def SearchStream(self, request_iterator: Iterator[Any], context) -> Iterator[pb.SearchStreamResponse]:
        requests = (r.request for r in request_iterator)
        for resp in self._search_stream(requests, context):
            yield pb.SearchStreamResponse(response=resp)

    def LegacySearchStream(self, request_iterator: Iterator[pb.SearchRequest], context) -> Iterator[pb.SearchResponse]:
        """SearchStream under the service's first name: bare SearchRequest / SearchResponse messages."""
        return self._search_stream(request_iterator, context)

    def _search_stream(self, request_iterator: Iterator[pb.SearchRequest], context) -> Iterator[pb.SearchResponse]:
        # Requests are taken in groups (whatever has arrived, up to max_batch) so a streaming client
        # gets batched encoding and index calls; responses keep the request order.
        max_batch = self.engine.settings.max_batch if self.engine is not None else 1
        limit = self.engine.settings.max_stream_buffer_bytes if self.engine is not None else 1 << 25
        pending = ByteBoundedQueue(2 * max_batch, limit)

        def read() -> None:
            try:
                for r in request_iterator:
                    if not pending.put(r, r.ByteSize(), context.is_active):
                        return
            except Exception:  # noqa: BLE001 - the client went away; end the stream
                pass
            finally:
                pending.close()

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        finished = False
        while not finished:
            first = self._next_request(pending, context)
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
            run = lambda b=batch: self._responses(self._counted("SearchStream", self._specs(b)), context)  # noqa: E731
            yield from self._call("SearchStream", context, run)

    def _next_request(self, pending: ByteBoundedQueue, context: grpc.ServicerContext) -> Any:
        """The stream's next request; None when it ended, was cancelled or stayed idle too long."""
        idle = self.engine.settings.stream_idle_seconds if self.engine is not None else 30.0
        waited = 0.0
        while context.is_active():
            try:
                return pending.get(timeout=0.25)
            except queue.Empty:
                waited += 0.25
                if waited >= idle:
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"stream idle for {idle:g} s; closed")
        return None

    def Encode(self, request, context):
        def run():
            if not request.HasField("query"):
                raise InvalidArgument("empty query: set exactly one of text, image or vector")
            spec = self._query(request.query)
            self.metrics.count_queries("Encode", [spec])
            code = self.engine.encode([spec], self._stopper(context))[0]
            resp = pb.EncodeResponse(code=_code_pb(code), stream=spec.stream)
            if request.decode_stream:
                decoded = self.engine.decode(code, request.decode_stream)[0]
                resp.decoded.CopyFrom(pb.Vector(stream=request.decode_stream, values=decoded.tolist()))
            return resp

        return self._call("Encode", context, run)

    def _info(self, name: str) -> pb.IndexInfo:
        info = self.engine.infos[name]
        m = info.manifest
        return pb.IndexInfo(
            name=name,
            stream=info.stream,
            n_items=info.n_items,
            shards=info.shards,
            checkpoint_sha256=m.checkpoint_sha256,
            manifest_json=_public_manifest(m),
            dense=info.dense,
            version=info.version,
        )

    def ListIndexes(self, request, context):
        return self._call(
            "ListIndexes", context, lambda: pb.ListIndexesResponse(indexes=[self._info(n) for n in sorted(self.engine.searchers)])
        )

    def LegacyGetIndex(self, request, context):
        """GetIndex under the service's first name: the bare IndexInfo."""

        def run():
            if request.name not in self.engine.searchers:
                raise NotFound(f"unknown index {request.name!r}; this server has {sorted(self.engine.searchers)}")
            return self._info(request.name)

        return self._call("GetIndex", context, run)

    def GetIndex(self, request, context):
        info = self.LegacyGetIndex(request, context)
        return pb.GetIndexResponse(index=info) if info is not None else None

    def GetLatent(self, request, context):
        def run():
            n_active, items = self.engine.latent_top_items(request.latent, request.index, request.top_k or 10)
            name = self.engine.names.get(request.latent)
            return pb.GetLatentResponse(
                latent=request.latent,
                index=request.index,
                n_active=n_active,
                items=[pb.LatentItem(id=str(i), value=v) for i, v in items],
                names=[name] if name else [],
            )

        return self._call("GetLatent", context, run)

    @staticmethod
    def _weights(target, names: dict[int, str], activations: dict[int, float] | None = None) -> list:
        return [
            pb.LatentWeight(latent=i, weight=w, name=names.get(i, ""), image_activation=(activations or {}).get(i, 0.0))
            for i, w in zip(target.latents, target.weights)
        ]

    def Localize(self, request, context):
        def run():
            hm = self.engine.localize(
                request.image,
                request.text,
                list(request.latents),
                list(request.weights),
                request.encoder_stream,
                _method(request, HEATMAP_METHODS),
                request.top,
                list(request.concepts),
                should_stop=self._stopper(context),
            )
            png = b""
            if request.return_png:
                png = heatmap_png(hm)
            h, w = hm.grid.shape
            return pb.LocalizeResponse(
                height=h,
                width=w,
                grid=hm.grid.ravel().tolist(),
                latents=self._weights(hm.target, self.engine.names, hm.activations),
                method=hm.method,
                stream=hm.stream,
                png=png,
                target_fires=hm.target_fires,
                note=hm.note,
            )

        return self._call("Localize", context, run)

    def AttributeText(self, request, context):
        def run():
            ws = self.engine.attribute(
                request.text, list(request.latents), _method(request, ATTRIBUTION_METHODS), should_stop=self._stopper(context)
            )
            png = words_png(ws, self.engine.names) if request.return_png else b""
            return pb.AttributeTextResponse(
                words=[pb.WordScore(word=wd, score=sc) for wd, sc in zip(ws.words, ws.scores)],
                latents=self._weights(ws.target, self.engine.names),
                method=ws.method,
                png=png,
            )

        return self._call("AttributeText", context, run)

    def ExplainPair(self, request, context):
        def run():
            pair = self.engine.explain_pair(
                request.image,
                request.text,
                request.encoder_stream,
                _method(request, HEATMAP_METHODS),
                request.max_latents,
                should_stop=self._stopper(context),
            )
            png = pair_png(pair) if request.return_png else b""
            shared = [
                pb.SharedConcept(
                    latent=c.latent,
                    name=self.engine.names.get(c.latent, ""),
                    image_value=c.image_value,
                    text_value=c.text_value,
                    height=c.heatmap.grid.shape[0],
                    width=c.heatmap.grid.shape[1],
                    grid=c.heatmap.grid.ravel().tolist(),
                    words=[pb.WordScore(word=wd, score=sc) for wd, sc in zip(c.words.words, c.words.scores)],
                )
                for c in pair.concepts
            ]
            return pb.ExplainPairResponse(
                shared=shared, image_only=pair.image_only, text_only=pair.text_only, stream=pair.stream, png=png
            )

        return self._call("ExplainPair", context, run)


# The services this server answers; any other path a client sends is one metric label, never its own.
_LABELLED_SERVICES = (SERVICE_NAME, LEGACY_SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                      "grpc.reflection.v1.ServerReflection")  # fmt: skip


def method_label(method: str) -> str:
    """The metric label of a called method path: its name when it is a method of a service this server
    answers, "unknown" for any other path (so random paths cannot grow the metrics without bound)."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service in (SERVICE_NAME, LEGACY_SERVICE_NAME):
        return name if name in pb.DESCRIPTOR.services_by_name["SparcService"].methods_by_name else "unknown"
    if service == ADMIN_SERVICE_NAME:
        return name if name in pb.DESCRIPTOR.services_by_name["SparcAdminService"].methods_by_name else "unknown"
    if service in _LABELLED_SERVICES and name in ("Check", "Watch", "ServerReflectionInfo"):
        return name
    return "unknown"


def _public_manifest(m: Any) -> str:
    """A bundle's manifest as clients see it: file names, never the server's absolute paths."""
    hidden = {k: Path(v).name for k in ("source", "checkpoint_path") if Path(v := getattr(m, k)).is_absolute()}
    return m.model_copy(update=hidden).model_dump_json()


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (``wrap(behaviour, request_streaming)``)."""
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = wrap(getattr(handler, attr), handler.request_streaming)
    return make(behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _abort_handler(code: grpc.StatusCode, message: str, response_streaming: bool):
    """A handler that refuses at once. Its request side is a stream it never reads, so grpc runs it as soon
    as the headers are in: a refused call never waits for (or holds a worker until) its body arrives."""

    def deny(request_iterator, context):
        context.abort(code, message)

    def deny_stream(request_iterator, context):
        context.abort(code, message)
        yield  # pragma: no cover - a generator, as a streaming handler must be

    if response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    return grpc.stream_unary_rpc_method_handler(deny)


class BearerAuth(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (scheme in any case); health checks stay open.

    Refusals are counted in ``sparc_auth_failures_total`` and logged at most once per ``log_every`` seconds
    (with the number refused since the last line), so a flood of wrong tokens cannot flood the log.
    """

    def __init__(self, token: str, metrics: Metrics | None = None, log_every: float = 10.0, skip_admin: bool = False) -> None:
        """``skip_admin``: leave the admin service's calls to their own check (AdminAuth)."""
        import hmac

        self._skip_admin = skip_admin
        self._token = token.encode()
        self._compare = hmac.compare_digest
        self._metrics = metrics
        self._log_every = log_every
        self._lock = threading.Lock()
        self._since_log = 0
        self._last_log = -float("inf")

    def _ok(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        return scheme.lower() == "bearer" and self._compare(token.strip().encode(), self._token)

    def _refused(self, method: str, peer_meta: dict) -> None:
        if self._metrics is not None:
            self._metrics.auth_failures.labels(method_label(method)).inc()
        now = time.monotonic()
        with self._lock:
            self._since_log += 1
            if now - self._last_log < self._log_every:
                return
            n, self._since_log, self._last_log = self._since_log, 0, now
        reason = "no authorization header" if "authorization" not in peer_meta else "wrong scheme or token"
        log.warning(json.dumps({"event": "auth_refused", "method": method, "refused": n, "reason": reason}))

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith("/grpc.health.v1.") or (self._skip_admin and method.startswith(f"/{ADMIN_SERVICE_NAME}/")):
            return continuation(handler_call_details)
        meta = dict(handler_call_details.invocation_metadata or ())
        if self._ok(str(meta.get("authorization", ""))):
            return continuation(handler_call_details)
        self._refused(method, meta)
        handler = continuation(handler_call_details)
        streaming = handler is not None and handler.response_streaming
        return _abort_handler(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", streaming)


class AdminAuth(BearerAuth):
    """The admin service's calls need the admin token (the search token does not open them); every other
    call passes. Without an admin token configured, admin calls are refused saying how to turn them on."""

    def __init__(self, token: str | None, metrics: Metrics | None = None) -> None:
        super().__init__(token or "", metrics)
        self._on = token is not None

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if not method.startswith(f"/{ADMIN_SERVICE_NAME}/"):
            return continuation(handler_call_details)
        if not self._on:
            return _abort_handler(grpc.StatusCode.FAILED_PRECONDITION, "admin calls are off: set admin_token_file", False)
        meta = dict(handler_call_details.invocation_metadata or ())
        if self._ok(str(meta.get("authorization", ""))):
            return continuation(handler_call_details)
        self._refused(method, meta)
        return _abort_handler(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid admin token", False)


class SparcAdminServicer(pb_grpc.SparcAdminServiceServicer):
    """The admin calls (behind AdminAuth)."""

    def __init__(self, server: SparcServer) -> None:
        self.server = server

    def DeleteItems(self, request, context):
        return _admin_delete(self.server, request, context)

    def ReloadIndex(self, request, context):
        engine = self.server.engine
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its checkpoint and indexes")
        unknown = [n for n in request.indexes if n not in engine.settings.indexes]
        if unknown:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown index {unknown[0]!r}; this server has {sorted(engine.searchers)}")
        out = self.server.reload_now(list(request.indexes) or None)
        return pb.ReloadIndexResponse(
            results=[pb.IndexReload(index=n, outcome=o, version=engine.infos[n].version) for n, o in sorted(out.items())]
        )


def _admin_delete(server: SparcServer, request, context):
    engine = server.engine
    if engine is None:
        context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its checkpoint and indexes")
    try:
        n, unknown = engine.delete_items(request.index, list(request.ids))
    except ServiceError as e:
        context.abort(status_of(e), e.message)
    server.metrics.index_items.labels(request.index).set(engine.infos[request.index].n_items)
    log.info(json.dumps({"event": "items_deleted", "index": request.index, "deleted": n, "unknown": len(unknown)}))
    return pb.DeleteItemsResponse(deleted=n, unknown_ids=unknown[:1000], version=engine.infos[request.index].version)


class RequestWait(grpc.ServerInterceptor):
    """Ends a call whose request message has not arrived ``seconds`` after the call began.

    grpc reads a unary request in the worker thread before the handler runs, so a client that sends the
    headers and never the body would hold that worker until the connection dies. Unary-request handlers are
    run here as request streams instead: the first message is read under a watchdog that cancels the call
    when the wait runs out (one watchdog thread for all calls)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[grpc.ServicerContext, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        while not self._stop.wait(min(0.1, self.seconds / 4)):
            now = time.monotonic()
            with self._lock:
                late = [ctx for ctx, until in self._waiting.values() if now > until]
            for ctx in late:
                ctx.cancel()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _first(self, request_iterator: Iterator, context: grpc.ServicerContext) -> Any:
        key = id(context)
        with self._lock:
            self._waiting[key] = (context, time.monotonic() + self.seconds)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="request-wait", daemon=True)
                self._thread.start()
        try:
            return next(request_iterator)
        except StopIteration:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message")
        except grpc.RpcError:  # cancelled by the watchdog (or by the client) while waiting
            context.abort(grpc.StatusCode.CANCELLED, f"no request message within {self.seconds:g} s")
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        first = self._first
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.response_streaming:
            behaviour = handler.unary_stream

            def one_in_many_out(request_iterator, context):
                yield from behaviour(first(request_iterator, context), context)

            return grpc.stream_stream_rpc_method_handler(one_in_many_out, **kw)
        unary = handler.unary_unary

        def one_in_one_out(request_iterator, context):
            return unary(first(request_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(one_in_one_out, **kw)


def _client_of(peer: str) -> str:
    """The client address of a gRPC peer string ("ipv4:10.0.0.1:5123" -> "ipv4:10.0.0.1")."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class StreamGate(grpc.ServerInterceptor):
    """Bounds streaming calls (SearchStream, reflection, health Watch), which each hold a worker thread while
    open: at most ``max_streams`` open on the server and ``per_client`` per client address, so unary calls
    always keep workers; health Watch streams (open to anyone, no token) have their own cap
    ``max_health_watches`` and never take a stream slot; a stream with no message either way for
    ``idle_seconds`` is cancelled."""

    def __init__(
        self,
        max_streams: int,
        per_client: int,
        idle_seconds: float,
        metrics: Metrics | None = None,
        max_health_watches: int = 1,
    ) -> None:
        self.max_streams, self.per_client, self.idle = max_streams, per_client, idle_seconds
        self.max_health = max_health_watches
        self._metrics = metrics
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._total = 0
        self._health = 0
        self._active: dict[int, list] = {}  # id -> [context, last activity]
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    def _acquire(self, client: str, health_watch: bool = False) -> str | None:
        with self._lock:
            if health_watch:
                if self._health >= self.max_health:
                    return f"server has {self._health} health watches open (max_health_watches {self.max_health})"
                self._health += 1
                return None
            if self._total >= self.max_streams:
                return f"server has {self._total} streams open (max_streams {self.max_streams})"
            if self._open.get(client, 0) >= self.per_client:
                return f"this client has {self._open[client]} streams open (max_streams_per_client {self.per_client})"
            self._total += 1
            self._open[client] = self._open.get(client, 0) + 1
            if self._metrics is not None:
                self._metrics.open_streams.set(self._total)
            return None

    def _release(self, client: str, key: int, health_watch: bool = False) -> None:
        with self._lock:
            if health_watch:
                self._health -= 1
                self._active.pop(key, None)
                return
            self._total -= 1
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]
            self._active.pop(key, None)
            if self._metrics is not None:
                self._metrics.open_streams.set(self._total)

    def _watch(self) -> None:
        while not self._stop.wait(min(0.5, self.idle / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [ctx for ctx, last in self._active.values() if now - last > self.idle]
            for ctx in idle:
                ctx.cancel()

    def close(self) -> None:
        self._stop.set()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        gate = self
        watch = (handler_call_details.method or "").startswith("/grpc.health.v1.")

        def wrap(behaviour: Callable, request_streaming: bool) -> Callable:
            def gated(request, context):
                client = _client_of(context.peer())
                refused = gate._acquire(client, watch)
                if refused is not None:
                    if gate._metrics is not None:
                        scope = "health" if watch else "server" if "server has" in refused else "client"
                        gate._metrics.streams_refused.labels(scope).inc()
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many open streams: {refused}")
                key = id(context)
                entry = [context, time.monotonic()]
                with gate._lock:
                    gate._active[key] = entry
                    if gate._watchdog is None:
                        gate._watchdog = threading.Thread(target=gate._watch, name="stream-watchdog", daemon=True)
                        gate._watchdog.start()

                def touched(it):
                    for item in it:
                        entry[1] = time.monotonic()
                        yield item

                try:
                    out = behaviour(touched(request) if request_streaming else request, context)
                    if handler.response_streaming:
                        for item in out:
                            entry[1] = time.monotonic()
                            yield item
                    else:
                        yield out
                finally:
                    gate._release(client, key, watch)

            if handler.response_streaming:
                return gated

            def unary_reply(request, context):  # a request stream with one reply: the gate, then the reply
                g = gated(request, context)
                try:
                    return next(g)
                finally:
                    g.close()  # releases the slot now, not when the generator is collected

            return unary_reply

        return _wrap_handler(handler, wrap)


def _read_pem(path: str, what: str, marker: str) -> bytes:
    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise FailedPrecondition(f"{what} {path}: unreadable ({e.strerror})") from None
    if marker.encode() not in data:
        raise FailedPrecondition(f"{what} {path}: no PEM '{marker}' block in it (cert and key swapped?)")
    return data


def _server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS (and mTLS) credentials, checked before the server binds; None without TLS."""
    if not settings.tls_cert:
        return None
    cert = _read_pem(settings.tls_cert, "tls_cert", "CERTIFICATE")
    key = _read_pem(settings.tls_key or "", "tls_key", "PRIVATE KEY")
    import ssl

    try:  # the key must belong to the certificate
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as e:
        raise FailedPrecondition(f"tls_cert and tls_key do not form a usable pair ({e.reason})") from None
    ca = _read_pem(settings.tls_client_ca, "tls_client_ca", "CERTIFICATE") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class SparcServer:
    """A running service: gRPC server, health, metrics endpoint."""

    def __init__(self, settings: ServiceSettings) -> None:
        from concurrent import futures

        self.settings = settings
        self._last_reload: dict[str, str] = {}
        self._deploying = threading.Lock()
        self._deployed: str | None = None
        self._poll_stop = threading.Event()
        self.health = health.HealthServicer()
        self.metrics = Metrics()
        creds = _server_credentials(settings)  # before binding: a bad TLS setup never serves plaintext
        token = settings.token()
        admin = settings.admin_token()
        self.streams = StreamGate(
            settings.stream_limit,
            settings.max_streams_per_client,
            settings.stream_idle_seconds,
            self.metrics,
            settings.health_watch_limit,
        )
        self.request_wait = RequestWait(settings.request_wait_seconds)
        # outermost first: refuse without a token, then bound the wait for the request, then gate the streams
        interceptors: list[grpc.ServerInterceptor] = [BearerAuth(token, self.metrics, skip_admin=True)] if token else []
        interceptors += [AdminAuth(admin, self.metrics), self.request_wait, self.streams]
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=options,
            # one call per worker: beyond that grpc refuses at once (RESOURCE_EXHAUSTED) instead of queueing
            maximum_concurrent_rpcs=settings.workers,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", SERVICE_NAME, LEGACY_SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{settings.host}:{settings.port}"
        try:
            self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise Unavailable(f"cannot listen on {address} ({e})") from None
        if self.port == 0:
            raise Unavailable(f"cannot listen on {address}")
        if settings.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.servicer = SparcServicer(None, self.metrics, settings.in_flight_limit)
        pb_grpc.add_SparcServiceServicer_to_server(self.servicer, self.server)
        pb_grpc.add_SparcAdminServiceServicer_to_server(SparcAdminServicer(self), self.server)
        self.server.add_generic_rpc_handlers((_legacy_handler(self.servicer),))
        self.engine: Engine | None = None
        self._metrics_server = None

    def _deployed_settings(self) -> ServiceSettings:
        """The settings with the deployment file's checkpoint and indexes (the settings alone without one)."""
        if self.settings.deployment_file is None:
            return self.settings
        d = read_deployment(self.settings.deployment_file)
        return self.settings.model_copy(update={"checkpoint": d.checkpoint, "indexes": d.indexes})

    def start(self) -> SparcServer:
        """Start listening (health NOT_SERVING), load checkpoint and indexes, then report SERVING."""
        self.server.start()
        try:
            self._deployed = fingerprint(self.settings.deployment_file) if self.settings.deployment_file else None
            self.engine = Engine(self._deployed_settings())
        except BaseException:
            self.server.stop(0)
            raise
        self.servicer.engine = self.engine
        for name, s in self.engine.searchers.items():
            self.metrics.index_items.labels(name).set(s.n_items)
            self.health.set(f"index/{name}", health_pb2.HealthCheckResponse.SERVING)
        self._index_ok = dict.fromkeys(self.engine.searchers, True)
        self.engine.index_health = self._index_health
        if self.settings.metrics_port:
            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
        for name in ("", SERVICE_NAME, LEGACY_SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(json.dumps({"event": "serving", "port": self.port, "indexes": sorted(self.engine.searchers)}))
        if self.settings.reload_poll_seconds > 0:
            threading.Thread(target=self._poll, name="index-reload", daemon=True).start()
        return self

    def redeploy(self) -> str:
        """Switch to the deployment file's deployment when it changed: a complete new engine is loaded beside
        the serving one and replaces it with one assignment (see service/deployment.py). "unchanged",
        "deployed CHECKPOINT" or "refused: why" (the old deployment keeps serving)."""
        f = self.settings.deployment_file
        if f is None or self.engine is None:
            return "unchanged"
        with self._deploying:
            try:
                now = fingerprint(f)
            except OSError as e:
                return f"refused: {f}: unreadable ({e.strerror})"
            if now == self._deployed:
                return "unchanged"
            try:
                engine = Engine(self._deployed_settings())
            except (ServiceError, SparcError) as e:
                self._deployed = now  # said once: the same file is not loaded again until it changes
                outcome = f"refused: {getattr(e, 'message', str(e))}"
                log.warning(json.dumps({"event": "deployment_refused", "detail": outcome}))
                self.metrics.index_reloads.labels("*", "refused").inc()
                return outcome
            old = self.engine
            engine.index_health = self._index_health
            self.engine = self.servicer.engine = engine  # the switch: every call from here on takes the new one
            self._deployed = now
            old.retire()
            for name, g in engine.searchers.items():
                self.metrics.index_items.labels(name).set(g.n_items)
                self.health.set(f"index/{name}", health_pb2.HealthCheckResponse.SERVING)
                self._index_ok[name] = True
            log.info(
                json.dumps(
                    {"event": "deployed", "checkpoint": engine.checkpoint_sha256[:12], "indexes": sorted(engine.searchers)}
                )
            )
            self.metrics.index_reloads.labels("*", "reloaded").inc()
            return f"deployed {engine.checkpoint_sha256[:12]}"

    def reload_now(self, names: list[str] | None = None) -> dict[str, str]:
        """Swap in a changed deployment (``redeploy``), else the new complete version of each index that has
        one (see Engine.reload): one log line and a metric per index that changed or was refused."""
        if self.engine is None:
            return {}
        deployed = self.redeploy()
        if deployed != "unchanged":
            return dict.fromkeys(self.engine.searchers, deployed)
        out = self.engine.reload(names)
        for name, outcome in out.items():
            if outcome == "unchanged":
                continue
            kind = "reloaded" if outcome.startswith("reloaded") else "refused"
            if self._last_reload.get(name) == outcome and kind == "refused":
                continue  # the same refused version: said once
            self._last_reload[name] = outcome
            self.metrics.index_reloads.labels(name, kind).inc()
            self.metrics.index_items.labels(name).set(self.engine.infos[name].n_items)
            say = log.info if kind == "reloaded" else log.warning
            say(json.dumps({"event": "index_" + kind, "index": name, "detail": outcome}))
        return out

    def _poll(self) -> None:
        while not self._poll_stop.wait(self.settings.reload_poll_seconds):
            try:
                self.reload_now()
            except Exception:  # noqa: BLE001 - a poll never takes the server down
                log.exception("index reload poll failed")

    def _index_health(self, name: str, ok: bool) -> None:
        """Health of one index (service name ``index/NAME``): NOT_SERVING while its store (a Milvus server)
        does not answer, SERVING again at its next answer; the server as a whole stays SERVING."""
        if self._index_ok.get(name) == ok:
            return
        self._index_ok[name] = ok
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(f"index/{name}", status)
        log.warning(json.dumps({"event": "index_health", "index": name, "serving": ok}))

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight calls finish for ``grace`` seconds, release everything."""
        self._poll_stop.set()
        self.health.enter_graceful_shutdown()
        # After the grace period grpc cancels the calls still running; their work checks for that and stops.
        self.server.stop(self.settings.grace_seconds if grace is None else grace).wait()
        self.streams.close()
        self.request_wait.close()
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
        if hasattr(signal, "SIGHUP"):  # reload: swap in the new versions of the indexes now
            signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=self.reload_now, daemon=True).start())
        done.wait()
        self.stop()
        log.info(json.dumps({"event": "stopped"}))
