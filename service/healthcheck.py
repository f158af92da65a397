"""The container's health probe: ``python -m service.healthcheck`` exits 0 when the server says SERVING.

It reads the same settings the server does (``SPARC_CONFIG``: the settings file, if any; then ``SPARC_*``
variables), so it follows the configured port and TLS: with ``tls_cert`` set it speaks TLS, trusting
``SPARC_HEALTHCHECK_CA`` (default: the server's own certificate file, right for a self-signed one) and
checking the name ``SPARC_HEALTHCHECK_HOSTNAME`` (default: localhost). A server that requires client
certificates (``tls_client_ca``) is probed with ``SPARC_HEALTHCHECK_CERT`` / ``SPARC_HEALTHCHECK_KEY``.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .settings import load_settings


def probe(environ: dict[str, str] | None = None, timeout: float = 3.0) -> bool:
    env = dict(os.environ if environ is None else environ)
    settings = load_settings(env.get("SPARC_CONFIG") or None, environ=env)
    host = settings.host if settings.host not in ("", "0.0.0.0", "::", "[::]") else "127.0.0.1"
    target = f"{host}:{settings.port}"
    if settings.tls_cert:
        ca = open(env.get("SPARC_HEALTHCHECK_CA") or settings.tls_cert, "rb").read()
        pair = (env.get("SPARC_HEALTHCHECK_KEY"), env.get("SPARC_HEALTHCHECK_CERT"))
        key, chain = (open(p, "rb").read() for p in pair) if all(pair) else (None, None)  # type: ignore[misc]
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
        name = env.get("SPARC_HEALTHCHECK_HOSTNAME", "localhost")
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    sys.exit(0 if probe() else 1)
