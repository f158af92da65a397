"""The servicer: protobuf messages to Engine calls, and the engine's refusals to status codes."""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from index import SearchParams
from index.errors import GalleryUnavailable
from index.params import SearchPath
from sparc_core import SparcError
from sparc_core.explain.attribution import heatmap_png, pair_png, words_png

from .engine import Engine, SearchSpec, SearchStopped
from .errors import DeadlineExceeded, InvalidArgument, NotFound, OverLimit, ServiceError, Unavailable
from .interceptors import ByteBoundedQueue
from .metrics import Metrics
from .wire import (
    ATTRIBUTION_METHODS,
    GRADIENT_METHODS,
    HEATMAP_METHODS,
    PATHS,
    code_pb,
    log,
    pb,
    pb_grpc,
    public_manifest,
    request_method,
    status_of,
)


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
                resp.explanation_basis = "sparse_code" if spec.path == SearchPath.DENSE else "score"
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
                resp.query_code.CopyFrom(code_pb(code))
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
            resp = pb.EncodeResponse(code=code_pb(code), stream=spec.stream)
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
            manifest_json=public_manifest(m),
            dense=info.dense,
            version=info.version,
        )

    def ListIndexes(self, request, context):
        return self._call(
            "ListIndexes", context, lambda: pb.ListIndexesResponse(indexes=[self._info(n) for n in sorted(self.engine.galleries)])
        )

    def LegacyGetIndex(self, request, context):
        """GetIndex under the service's first name: the bare IndexInfo."""

        def run():
            if request.name not in self.engine.galleries:
                raise NotFound(f"unknown index {request.name!r}; this server has {sorted(self.engine.galleries)}")
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
                request_method(request, HEATMAP_METHODS),
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
                request.text,
                list(request.latents),
                request_method(request, ATTRIBUTION_METHODS),
                should_stop=self._stopper(context),
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
                request_method(request, HEATMAP_METHODS),
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
