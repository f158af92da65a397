"""The one error type of the service's engine: a refusal with a gRPC status code name."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses; ``code`` is a grpc.StatusCode name (mapped in server.py only)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
