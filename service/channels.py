"""Client channels to the sparc service: gRPC's own retry policy and retry throttle, TLS, one shared blocking
channel per target in a process, and the stubs and auth metadata both clients use."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from .protogen import ensure_stubs

ensure_stubs()
from ._proto.sparc.v1 import sparc_pb2 as pb  # noqa: E402
from ._proto.sparc.v1 import sparc_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["SparcService"].full_name
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
RETRY_TOKENS = 6  # the retry throttle's bucket (see channel_options)


def channel_options(max_message_bytes: int = 16 * 1024 * 1024, retries: int = 4) -> list[tuple[str, object]]:
    """Channel options: message limits and gRPC's own retry policy for the sparc service (``retries``
    attempts in all, backoff 0.1 s doubling to 2 s, with jitter; calls refused with UNAVAILABLE or
    RESOURCE_EXHAUSTED are retried, within the call's deadline)."""
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if retries > 1:
        policy = {
            "maxAttempts": min(int(retries), 5),  # gRPC caps attempts at 5
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(RETRYABLE),
        }
        config = {
            "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": policy}],
            # a bucket of 6 tokens, shared by every channel of the process to the same target: a failed
            # attempt takes 1, a success gives 0.1 back, and retries go only while more than 3 are left, so
            # under sustained refusal the process sends about one attempt per call
            "retryThrottling": {"maxTokens": RETRY_TOKENS, "tokenRatio": 0.1},
        }
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    else:
        options.append(("grpc.enable_retries", 0))
    return options


def _channel(target: str, options: list, root_certificates: bytes | None, client_key: bytes | None,
             client_cert: bytes | None, aio: bool = False) -> Any:  # fmt: skip
    """A blocking (or grpc.aio) channel: TLS when ``root_certificates`` is given, with a client certificate
    when ``client_key`` + ``client_cert`` are."""
    module: Any = grpc.aio if aio else grpc
    if root_certificates is None:
        return module.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates, private_key=client_key, certificate_chain=client_cert)
    return module.secure_channel(target, creds, options=options)


class _SharedChannels:
    """One blocking channel per (target, options, credentials) in a process, shared by every client made
    with them and closed when the last one closes: gRPC's recommended reuse, and what makes the retry
    throttle (a per-channel bucket) bound the retries of the whole process rather than of each client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._channels: dict[tuple, list] = {}  # key -> [channel, clients using it]

    def acquire(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._channels.get(key)
            if entry is None:
                entry = self._channels[key] = [make(), 0]
            entry[1] += 1
            return entry[0]

    def release(self, key: tuple) -> None:
        with self._lock:
            entry = self._channels.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._channels[key]
                entry[0].close()


_SHARED = _SharedChannels()


class _Connection:
    """The channel, stubs and auth metadata both clients share (``_aio``: a grpc.aio channel)."""

    _aio = False

    def __init__(
        self,
        target: str,
        token: str | None = None,
        root_certificates: bytes | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        client_key: bytes | None = None,
        client_cert: bytes | None = None,
        retries: int = 4,
    ) -> None:
        """``root_certificates`` turns TLS on; ``client_key`` + ``client_cert`` (PEM) present a client
        certificate to a server that requires one (tls_client_ca); ``retries``: attempts per call for
        UNAVAILABLE / RESOURCE_EXHAUSTED (1: no retry)."""
        options = channel_options(max_message_bytes, retries)
        if self._aio:  # an asyncio channel belongs to its event loop: never shared
            self.channel, self._key = _channel(target, options, root_certificates, client_key, client_cert, aio=True), None
        else:
            self._key = (target, json.dumps(options, default=str), root_certificates, client_key, client_cert)
            self.channel = _SHARED.acquire(
                self._key, lambda: _channel(target, options, root_certificates, client_key, client_cert)
            )
        self.stub = pb_grpc.SparcServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _release(self) -> None:
        """Give the shared blocking channel back (closed when its last client lets go)."""
        if self._key is not None:
            _SHARED.release(self._key)
            self._key = None
