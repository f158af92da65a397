"""The service's protobuf messages and enums, public: ``from service.messages import Query, SearchRequest``.

Generated from ``protos/sparc/v1/sparc.proto`` (package ``sparc.v1``); this module re-exports them so that
callers never import the generated package (``service._proto``), whose layout is not part of the API.
"""

from __future__ import annotations

from .protogen import ensure_stubs

ensure_stubs()
from ._proto.sparc.v1.sparc_pb2 import *  # noqa: E402, F403
from ._proto.sparc.v1.sparc_pb2 import DESCRIPTOR  # noqa: E402, F401
