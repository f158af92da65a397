"""The gRPC server: transport (workers, limits, TLS), the services it registers (Sparc under both names,
admin, health, reflection), the metrics endpoint, deployments and reloads, and graceful shutdown.

The calls themselves: ``servicer.py`` (and ``admin.py``); what every call passes through first:
``interceptors.py``; protobuf glue and the error-to-status table: ``wire.py``; metrics: ``metrics.py``.
"""

from __future__ import annotations

import json
import signal
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from sparc_core import SparcError

from .admin import SparcAdminServicer
from .deployment import fingerprint, read_deployment
from .engine import Engine
from .errors import FailedPrecondition, ServiceError, Unavailable
from .interceptors import AdminAuth, BearerAuth, RequestWait, StreamGate
from .metrics import Metrics
from .servicer import SparcServicer
from .settings import ServiceSettings
from .wire import LEGACY_SERVICE_NAME, SERVICE_NAME, log, pb, pb_grpc


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
        for name, s in self.engine.galleries.items():
            self.metrics.index_items.labels(name).set(s.n_items)
            self.health.set(f"index/{name}", health_pb2.HealthCheckResponse.SERVING)
        self._index_ok = dict.fromkeys(self.engine.galleries, True)
        self.engine.index_health = self._index_health
        if self.settings.metrics_port:
            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
        for name in ("", SERVICE_NAME, LEGACY_SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(json.dumps({"event": "serving", "port": self.port, "indexes": sorted(self.engine.galleries)}))
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
            for name, g in engine.galleries.items():
                self.metrics.index_items.labels(name).set(g.n_items)
                self.health.set(f"index/{name}", health_pb2.HealthCheckResponse.SERVING)
                self._index_ok[name] = True
            log.info(
                json.dumps(
                    {"event": "deployed", "checkpoint": engine.checkpoint_sha256[:12], "indexes": sorted(engine.galleries)}
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
            return dict.fromkeys(self.engine.galleries, deployed)
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
