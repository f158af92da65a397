"""The protocol glue of the gRPC service: the generated messages, the service names, the enum tables between
protobuf and the engine, and the table that turns the engine's errors into gRPC status codes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from index.params import SearchPath

from .errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from .protogen import ensure_stubs

ensure_stubs()
from ._proto.sparc.v1 import sparc_pb2 as pb  # noqa: E402
from ._proto.sparc.v1 import sparc_pb2_grpc as pb_grpc  # noqa: E402

__all__ = [
    "ADMIN_SERVICE_NAME", "ATTRIBUTION_METHODS", "GRADIENT_METHODS", "HEATMAP_METHODS", "LEGACY_SERVICE_NAME", "PATHS",
    "SERVICE_NAME", "STATUS", "abort_handler", "code_pb", "method_label", "pb", "pb_grpc", "public_manifest",
    "request_method", "status_of", "wrap_handler",
]  # fmt: skip

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SparcService"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SparcAdminService"].full_name
# The service's first name: still answered, with the message types of that time, so deployed clients keep working.
LEGACY_SERVICE_NAME = "sparc.v1.Sparc"
# The proto's search-path enum and the library's (index.params.SearchPath), in one table; the client reads it
# backwards.
PATHS = {
    pb.SEARCH_PATH_UNSPECIFIED: None,
    pb.SEARCH_PATH_SPARSE: SearchPath.SPARSE,
    pb.SEARCH_PATH_DENSE: SearchPath.DENSE,
    pb.SEARCH_PATH_APPROX: SearchPath.APPROX,
    pb.SEARCH_PATH_SEISMIC: SearchPath.SEISMIC,
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


def request_method(request: Any, names: dict[int, str]) -> str:
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


def code_pb(code: Any, row: int = 0) -> pb.SparseCode:
    vals = code.values[row]
    keep = vals > 0
    return pb.SparseCode(indices=code.indices[row][keep].tolist(), values=vals[keep].tolist())


GRADIENT_METHODS = ("Localize", "AttributeText", "ExplainPair")


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


def public_manifest(m: Any) -> str:
    """A bundle's manifest as clients see it: file names, never the server's absolute paths."""
    hidden = {k: Path(v).name for k in ("source", "checkpoint_path") if Path(v := getattr(m, k)).is_absolute()}
    return m.model_copy(update=hidden).model_dump_json()


def wrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
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


def abort_handler(code: grpc.StatusCode, message: str, response_streaming: bool):
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
