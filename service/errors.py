"""The errors the service's engine raises: each class is one kind of refusal; service/server.py alone maps
them to gRPC status codes."""

from __future__ import annotations


class ServiceError(Exception):
    """A request (or a configuration) the service refuses; the subclass says why."""

    def __init__(self, *args: str) -> None:
        """``(message)``; or, from code written before the subclasses, ``(status code name, message)``."""
        if len(args) not in (1, 2):
            raise TypeError("ServiceError takes a message (or a status code name and a message)")
        super().__init__(args[-1])
        self.message = args[-1]
        self.code = args[0] if len(args) == 2 else None

    def prefixed(self, prefix: str) -> ServiceError:
        """The same refusal with ``prefix`` before its message (e.g. which request of a batch)."""
        return type(self)(*((self.code,) if self.code else ()), prefix + self.message)


class InvalidArgument(ServiceError):
    """The request itself is wrong: an empty query, an unknown stream, a value out of range."""


class NotFound(ServiceError):
    """The request names an index that this server does not have."""


class FailedPrecondition(ServiceError):
    """The server is not set up for the request (no encoder for text, an index without a dense part), or
    its configuration is unusable."""


class ResourceExhausted(ServiceError):
    """The request would cost more than the server allows per call, or every slot is taken."""


class OverLimit(ResourceExhausted):
    """The request is over a fixed per-call limit (batch size, hits, reply size): sending it again can never
    succeed, so it is answered with gRPC's "do not retry" push-back (the client's retry policy stops)."""


class Unavailable(ServiceError):
    """The server (or a store behind it) cannot answer now; the client may retry."""


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before its work could start."""


__all__ = [
    "DeadlineExceeded", "FailedPrecondition", "InvalidArgument", "NotFound", "OverLimit", "ResourceExhausted", "ServiceError",
    "Unavailable",
]  # fmt: skip
