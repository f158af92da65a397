"""Typed Python clients for the sparc gRPC service: blocking (``SparcClient``) and asyncio
(``AsyncSparcClient``), with the same methods.

    from service.client import SparcClient
    with SparcClient("127.0.0.1:50051") as c:
        hits = c.search_vector("clip_txt", vec, indexes=["images"], top_k=5, explain=True)

    async with AsyncSparcClient("127.0.0.1:50051") as c:
        hits = await c.search_text("a dog on a beach", indexes=["images"])

Calls refused with UNAVAILABLE or RESOURCE_EXHAUSTED are retried by gRPC itself (its retry policy in the
channel's service config: up to ``retries`` attempts, exponential backoff with jitter, within the call's
deadline); ``retries=1`` turns that off. Retries cannot amplify an overload: the channel's retry throttle
(``retryThrottling``) stops retrying once failures outnumber successes (three failed attempts in a row
empty its bucket; ten successes give one retry back), and a refusal the server knows is final (a call
over a per-call limit) carries gRPC's "do not retry" push-back. The messages are public in ``service.messages``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from .protogen import ensure_stubs

ensure_stubs()
from ._proto.sparc.v1 import sparc_pb2 as pb  # noqa: E402
from ._proto.sparc.v1 import sparc_pb2_grpc as pb_grpc  # noqa: E402
from .channels import RETRY_TOKENS, RETRYABLE, SERVICE, _Connection, channel_options  # noqa: E402, F401
from .wire import PATHS as PROTO_PATHS  # noqa: E402

PATHS = {path: code for code, path in PROTO_PATHS.items()}  # a search path (or None) -> the proto's enum


@dataclass
class SharedLatent:
    latent: int
    query_value: float
    item_value: float
    contribution: float
    name: str = ""  # set when the server's checkpoint has latent names


@dataclass
class Hit:
    id: str
    score: float
    rank: int
    index: str
    explanation: list[SharedLatent] = field(default_factory=list)
    index_version: str = ""  # the version of its index that answered


@dataclass
class SearchReply:
    hits: list[Hit]
    path: str
    query_stream: str
    query_code: tuple[list[int], list[float]] | None = None
    # with explain: "score" (contributions add up to each hit's score) or "sparse_code" (dense path: what the
    # codes share, not a decomposition of the score)
    explanation_basis: str = ""
    checkpoint_sha256: str = ""  # the checkpoint that encoded the query and whose codes were searched


def _result(r: pb.SearchResponse) -> SearchReply:
    hits = [
        Hit(
            h.id,
            h.score,
            h.rank,
            h.index,
            [SharedLatent(e.latent, e.query_value, e.item_value, e.contribution, e.name) for e in h.explanation],
            h.index_version,
        )
        for h in r.hits
    ]
    code = (list(r.query_code.indices), list(r.query_code.values)) if r.HasField("query_code") else None
    return SearchReply(hits, r.path, r.query_stream, code, r.explanation_basis, r.checkpoint_sha256)


def make_query(
    text: str | None = None,
    image: bytes | None = None,
    stream: str | None = None,
    vector: Sequence[float] | np.ndarray | None = None,
    encoder_stream: str = "",
) -> pb.Query:
    """A Query message from exactly one of text, image bytes, or (stream, vector). ``encoder_stream`` picks
    the encoder of a text or image query (e.g. "dino" for an image; default: the server's)."""
    given = [x is not None for x in (text, image, vector)]
    if sum(given) != 1:
        raise ValueError("give exactly one of text, image or vector")
    if text is not None:
        return pb.Query(text=text, encoder_stream=encoder_stream)
    if image is not None:
        return pb.Query(image=image, encoder_stream=encoder_stream)
    return pb.Query(vector=pb.Vector(stream=stream or "", values=np.asarray(vector, dtype=np.float32).tolist()))


def search_request(
    query: pb.Query,
    indexes: Sequence[str],
    top_k: int = 10,
    path: str | None = None,
    explain: bool = False,
    return_code: bool = False,
    require: Sequence[int] = (),
    exclude: Sequence[int] = (),
    boost: dict[int, float] | None = None,
    nprobe: int = 0,
    query_cut: int = 0,
    heap_factor: float = 0.0,
    budget: float = 0.0,
    candidates: int = 0,
) -> pb.SearchRequest:
    """A SearchRequest message."""
    return pb.SearchRequest(
        query=query,
        indexes=list(indexes),
        top_k=top_k,
        path=PATHS[path],
        explain=explain,
        return_code=return_code,
        nprobe=nprobe,
        query_cut=query_cut,
        heap_factor=heap_factor,
        budget=budget,
        candidates=candidates,
        filter=pb.LatentFilter(require=list(require), exclude=list(exclude), boost=boost or {}),
    )


HEATMAP_METHODS = {
    "relevance": pb.HEATMAP_METHOD_RELEVANCE,
    "gradcam": pb.HEATMAP_METHOD_GRADCAM,
    "grad-x-input": pb.HEATMAP_METHOD_GRAD_X_INPUT,
    "clip-relevance": pb.HEATMAP_METHOD_CLIP_RELEVANCE,
    "clip-cosine": pb.HEATMAP_METHOD_CLIP_COSINE,
    "clip-sim": pb.HEATMAP_METHOD_CLIP_COSINE,  # clip-cosine's earlier name
}
ATTRIBUTION_METHODS = {"grad": pb.ATTRIBUTION_METHOD_GRAD, "relevance": pb.ATTRIBUTION_METHOD_RELEVANCE}


def _method(method: str, table: dict[str, int]) -> dict[str, Any]:
    """The request fields for a method given by name: its enum value; a name the client does not know goes
    as ``method_name`` so that the server answers with the methods it has."""
    return {"method": table[method]} if method in table else {"method_name": method}


class SparcClient(_Connection):
    """Blocking client; every call takes an optional ``timeout`` (seconds) that becomes the gRPC deadline."""

    def __enter__(self) -> SparcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._release()

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING, NOT_SERVING, ... for the whole server ("") or a service name."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server reports SERVING."""
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=1.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"server not SERVING after {timeout}s")
            time.sleep(0.05)

    def search(self, request: pb.SearchRequest, timeout: float | None = None) -> SearchReply:
        return _result(self.stub.Search(request, timeout=timeout, metadata=self.metadata))

    def search_vector(
        self,
        stream: str,
        vector: Sequence[float] | np.ndarray,
        indexes: Sequence[str],
        top_k: int = 10,
        path: str | None = None,
        explain: bool = False,
        timeout: float | None = None,
        **kw,
    ) -> SearchReply:
        """Search with one raw feature vector of ``stream``."""
        req = search_request(make_query(stream=stream, vector=vector), indexes, top_k, path, explain, **kw)
        return self.search(req, timeout)

    def search_text(self, text: str, indexes: Sequence[str], top_k: int = 10, timeout: float | None = None, **kw) -> SearchReply:
        return self.search(search_request(make_query(text=text), indexes, top_k, **kw), timeout)

    def search_image(
        self, image: bytes, indexes: Sequence[str], top_k: int = 10, encoder_stream: str = "", timeout: float | None = None, **kw
    ) -> SearchReply:
        """Search with image bytes (JPEG/PNG/WebP), encoded by ``encoder_stream``'s encoder (e.g. "dino")."""
        return self.search(search_request(make_query(image=image, encoder_stream=encoder_stream), indexes, top_k, **kw), timeout)

    def search_batch(self, requests: Sequence[pb.SearchRequest], timeout: float | None = None) -> list[SearchReply]:
        r = self.stub.SearchBatch(pb.SearchBatchRequest(requests=list(requests)), timeout=timeout, metadata=self.metadata)
        return [_result(x) for x in r.responses]

    def search_stream(self, requests: Iterable[pb.SearchRequest], timeout: float | None = None) -> Iterator[SearchReply]:
        wrapped = (pb.SearchStreamRequest(request=r) for r in requests)
        for r in self.stub.SearchStream(wrapped, timeout=timeout, metadata=self.metadata):
            yield _result(r.response)

    def reload_index(self, admin_token: str, indexes: Sequence[str] = (), timeout: float | None = None) -> dict[str, str]:
        """Swap in the new versions of ``indexes`` (all when empty) now (an admin call: ``admin_token``, not
        the search token); index -> "unchanged", "reloaded OLD -> NEW" or "refused: why"."""
        stub = pb_grpc.SparcAdminServiceStub(self.channel)
        r = stub.ReloadIndex(pb.ReloadIndexRequest(indexes=list(indexes)), timeout=timeout,
                             metadata=(("authorization", f"Bearer {admin_token}"),))  # fmt: skip
        return {x.index: x.outcome for x in r.results}

    def delete_items(
        self, admin_token: str, index: str, ids: Sequence[Any], timeout: float | None = None
    ) -> tuple[int, list[str]]:
        """Delete items by id from ``index`` (an admin call); (deleted, ids not found)."""
        stub = pb_grpc.SparcAdminServiceStub(self.channel)
        r = stub.DeleteItems(pb.DeleteItemsRequest(index=index, ids=[str(x) for x in ids]), timeout=timeout,
                             metadata=(("authorization", f"Bearer {admin_token}"),))  # fmt: skip
        return int(r.deleted), list(r.unknown_ids)

    def encode(self, query: pb.Query, decode_stream: str = "", timeout: float | None = None) -> pb.EncodeResponse:
        return self.stub.Encode(
            pb.EncodeRequest(query=query, decode_stream=decode_stream), timeout=timeout, metadata=self.metadata
        )

    def list_indexes(self, timeout: float | None = None) -> list[pb.IndexInfo]:
        return list(self.stub.ListIndexes(pb.ListIndexesRequest(), timeout=timeout, metadata=self.metadata).indexes)

    def get_index(self, name: str, timeout: float | None = None) -> pb.IndexInfo:
        return self.stub.GetIndex(pb.GetIndexRequest(name=name), timeout=timeout, metadata=self.metadata).index

    def get_latent(self, latent: int, index: str, top_k: int = 10, timeout: float | None = None) -> pb.GetLatentResponse:
        return self.stub.GetLatent(
            pb.GetLatentRequest(latent=latent, index=index, top_k=top_k), timeout=timeout, metadata=self.metadata
        )

    def localize(
        self,
        image: bytes,
        text: str = "",
        latents: Sequence[int] = (),
        weights: Sequence[float] = (),
        encoder_stream: str = "",
        method: str = "relevance",
        return_png: bool = False,
        top: int = 0,
        timeout: float | None = None,
        concepts: Sequence[str] = (),
    ) -> HeatmapReply:
        """Where a caption's concepts (``text``), chosen ``latents`` or the latents named ``concepts`` are in
        ``image`` (JPEG/PNG/WebP bytes)."""
        r = self.stub.Localize(
            pb.LocalizeRequest(
                image=image, text=text, latents=list(latents), weights=list(weights), encoder_stream=encoder_stream,
                return_png=return_png, top=top, concepts=list(concepts), **_method(method, HEATMAP_METHODS),
            ),
            timeout=timeout,
            metadata=self.metadata,
        )  # fmt: skip
        grid = np.asarray(r.grid, dtype=np.float32).reshape(r.height, r.width)
        latents_used = [(x.latent, x.weight, x.name, x.image_activation) for x in r.latents]
        return HeatmapReply(grid, latents_used, r.method, r.stream, r.png, r.target_fires, r.note)

    def explain_pair(
        self,
        image: bytes,
        text: str,
        encoder_stream: str = "",
        method: str = "relevance",
        max_latents: int = 0,
        return_png: bool = False,
        timeout: float | None = None,
    ) -> pb.ExplainPairResponse:
        """The latents an image (JPEG/PNG/WebP bytes) and its caption share: per latent its heatmap grid and the
        caption's word scores (the reply message, ``shared`` strongest first)."""
        return self.stub.ExplainPair(
            pb.ExplainPairRequest(
                image=image, text=text, encoder_stream=encoder_stream, max_latents=max_latents,
                return_png=return_png, **_method(method, HEATMAP_METHODS),
            ),
            timeout=timeout,
            metadata=self.metadata,
        )  # fmt: skip

    def attribute_text(
        self, text: str, latents: Sequence[int] = (), method: str = "grad", return_png: bool = False, timeout: float | None = None
    ) -> WordAttribution:
        """Per-word scores of ``text`` for its own code (or chosen ``latents``)."""
        r = self.stub.AttributeText(
            pb.AttributeTextRequest(
                text=text, latents=list(latents), return_png=return_png, **_method(method, ATTRIBUTION_METHODS)
            ),
            timeout=timeout,
            metadata=self.metadata,
        )
        return WordAttribution(
            [(w.word, w.score) for w in r.words], [(x.latent, x.weight, x.name) for x in r.latents], r.method, r.png
        )


@dataclass
class HeatmapReply:
    """A Localize reply: the [h, w] grid in [0, 1], the latents used (latent, weight, name, value in the
    image's code), the method and image stream, and the PNG overlay when asked for."""

    grid: np.ndarray
    latents: list[tuple[int, float, str, float]]
    method: str
    stream: str
    png: bytes = b""
    target_fires: bool = True  # False: none of the target's latents fires on the image, the grid is all 0
    note: str = ""


@dataclass
class WordAttribution:
    """An AttributeText reply: (word, score) pairs, the latents used (latent, weight, name), the PNG strip."""

    words: list[tuple[str, float]]
    latents: list[tuple[int, float, str]]
    method: str
    png: bytes = b""


class AsyncSparcClient(_Connection):
    """The asyncio client (grpc.aio): the search calls, health and the index listing, awaited.

    ``async with AsyncSparcClient(target) as c: res = await c.search_text("a dog", indexes=["images"])``
    """

    _aio = True

    async def __aenter__(self) -> AsyncSparcClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        r = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def search(self, request: pb.SearchRequest, timeout: float | None = None) -> SearchReply:
        return _result(await self.stub.Search(request, timeout=timeout, metadata=self.metadata))

    async def search_vector(
        self, stream: str, vector: Sequence[float] | np.ndarray, indexes: Sequence[str], top_k: int = 10,
        timeout: float | None = None, **kw,
    ) -> SearchReply:  # fmt: skip
        return await self.search(search_request(make_query(stream=stream, vector=vector), indexes, top_k, **kw), timeout)

    async def search_text(
        self, text: str, indexes: Sequence[str], top_k: int = 10, timeout: float | None = None, **kw
    ) -> SearchReply:
        return await self.search(search_request(make_query(text=text), indexes, top_k, **kw), timeout)

    async def search_image(
        self, image: bytes, indexes: Sequence[str], top_k: int = 10, encoder_stream: str = "", timeout: float | None = None, **kw
    ) -> SearchReply:
        query = make_query(image=image, encoder_stream=encoder_stream)
        return await self.search(search_request(query, indexes, top_k, **kw), timeout)

    async def search_batch(self, requests: Sequence[pb.SearchRequest], timeout: float | None = None) -> list[SearchReply]:
        r = await self.stub.SearchBatch(pb.SearchBatchRequest(requests=list(requests)), timeout=timeout, metadata=self.metadata)
        return [_result(x) for x in r.responses]

    async def list_indexes(self, timeout: float | None = None) -> list[pb.IndexInfo]:
        r = await self.stub.ListIndexes(pb.ListIndexesRequest(), timeout=timeout, metadata=self.metadata)
        return list(r.indexes)


_RENAMED = {"SearchResult": "SearchReply", "Heatmap": "HeatmapReply"}  # earlier names (the library's own
# index.SearchResult and sparc_core.explain.attribution.Heatmap are other things)


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        import warnings

        warnings.warn(f"service.client.{name} is now called {_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
