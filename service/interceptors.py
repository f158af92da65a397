"""What every call passes through before the servicer: the bearer-token checks, the bounded wait for a
request's body, the stream gate, and the bounded read-ahead buffer of a stream."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from .metrics import Metrics
from .wire import ADMIN_SERVICE_NAME, abort_handler, log, method_label, wrap_handler


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
        return abort_handler(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", streaming)


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
            return abort_handler(grpc.StatusCode.FAILED_PRECONDITION, "admin calls are off: set admin_token_file", False)
        meta = dict(handler_call_details.invocation_metadata or ())
        if self._ok(str(meta.get("authorization", ""))):
            return continuation(handler_call_details)
        self._refused(method, meta)
        return abort_handler(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid admin token", False)


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

        return wrap_handler(handler, wrap)
