"""The admin service (ReloadIndex, DeleteItems), behind its own token."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc

from .errors import ServiceError

if TYPE_CHECKING:
    from .server import SparcServer
from .wire import log, pb, pb_grpc, status_of


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
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown index {unknown[0]!r}; this server has {sorted(engine.galleries)}")
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
