"""The retrieval engine behind the gRPC surface: validates requests, batches encodes, calls sparc_core and
index, and raises the typed refusals of service/errors.py (server.py maps them to status codes). It holds
no model maths and no search maths (the merge over indexes is index.merge_results).

Its parts: ``specs`` (what it takes and gives), ``batcher`` (the encode micro-batcher on the model thread),
``concepts`` (Localize, AttributeText, ExplainPair on the gradient lane, mixed into ``Engine``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin TimeoutError before Python 3.11
from typing import Any

import numpy as np
import torch

from index import Gallery, SearchResult, SearchStopped, merge_results, open_gallery
from index.errors import BundleError, GalleryUnavailable
from index.faiss_backend import DenseIndexError, parse_gpus
from index.manifest import current_version
from index.params import SearchPath
from sparc_core import SparseCode, checkpoint_hash, load_checkpoint
from sparc_core.checkpoint import pick_device
from sparc_core.encoders import FeatureEncoder, load_encoders
from sparc_core.explain.naming import load_latent_names
from sparc_core.model import CodeKind

from .batcher import EncodeBatcher
from .concepts import MAX_TARGET_LATENTS, ConceptCalls
from .errors import FailedPrecondition, InvalidArgument, NotFound, OverLimit, ServiceError
from .images import decode_image
from .lanes import GradientLane
from .settings import ServiceSettings
from .specs import EXPLANATION_BYTES, HIT_BYTES, QuerySpec, SearchSpec, ServedHit, served_hit

__all__ = [
    "Engine", "EncodeBatcher", "SearchSpec", "QuerySpec", "ServiceError", "SearchStopped", "ServedHit", "MAX_TARGET_LATENTS",
]  # fmt: skip


MAX_DELETE_IDS = 100_000  # ids per DeleteItems call


class Engine(ConceptCalls):
    """Loaded checkpoint, index galleries and (optional) query encoders."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._users = 0  # calls holding this engine (a replaced engine closes when the last one ends)
        self._users_lock = threading.Lock()
        self._retired = False
        self.model = load_checkpoint(settings.checkpoint, device=pick_device(settings.device))
        self.checkpoint_sha256 = checkpoint_hash(settings.checkpoint)
        self.names = load_latent_names(settings.checkpoint)  # latent -> name ({} without latent_names.json)
        self.galleries: dict[str, Gallery] = {}
        self._swap = threading.Lock()  # galleries and infos change together (reload)
        self._reloading = threading.Lock()  # one reload at a time
        try:
            self.faiss_gpus = parse_gpus(settings.faiss_gpus, settings.device)
        except DenseIndexError as e:
            raise FailedPrecondition(str(e)) from None
        for name, bundles in settings.indexes.items():
            try:  # the bundles (or collection) must record this checkpoint: open_gallery checks it
                self.galleries[name] = self._open(bundles)
            except BundleError as e:
                raise FailedPrecondition(f"index {name!r}: {e}") from None
        self.infos = {name: g.info() for name, g in self.galleries.items()}
        self.encoders = load_encoders(settings.encoders) if settings.encoders is not None else {}
        for stream, enc in self.encoders.items():
            dim = self.model.cfg.streams.get(stream)
            if dim != enc.dim:
                raise FailedPrecondition(
                    f"encoder {enc.name} feeds stream {stream!r} with {enc.dim}-d features, but the checkpoint "
                    + (f"takes {dim}-d for it" if dim else f"has no such stream (it has {self.model.streams})"),
                )
        self.encoder_streams = {kind: [s for s, e in self.encoders.items() if e.modality == kind] for kind in ("text", "image")}
        self.default_stream = {
            kind: self._default_stream(kind, getattr(settings, f"{kind}_stream")) for kind in ("text", "image")
        }
        self.batcher = EncodeBatcher(self.model, self.encoders, settings.batch_max_size, settings.batch_max_wait_ms)
        # a replica only where gradient work can run (it needs the encoders): a vector-only server copies nothing
        lane_size, replica = settings.max_gradient_calls, settings.gradient_replica and bool(self.encoders)
        self.index_health: Callable[[str, bool], None] = lambda name, ok: None  # set by the server (health per index)
        self.lane = GradientLane(self.model, self.encoders, lane_size, replica=replica, run_shared=self.batcher.call)
        self._decoders = threading.BoundedSemaphore(settings.image_decoders)

    def _open(self, locations: list[str]) -> Gallery:
        return open_gallery(
            locations, model=self.model, gpus=self.faiss_gpus, shard_gpus=self.settings.faiss_gpu_shard,
            checkpoint_sha256=self.checkpoint_sha256,
        )  # fmt: skip

    @property
    def searchers(self) -> dict[str, Gallery]:
        """The earlier name of ``galleries`` (deprecated)."""
        warnings.warn("Engine.searchers is now called Engine.galleries", DeprecationWarning, stacklevel=2)
        return self.galleries

    def served(self) -> tuple[dict[str, Gallery], dict[str, Any]]:
        """The galleries and their infos as served now (one consistent snapshot: a call uses it throughout)."""
        with self._swap:
            return dict(self.galleries), dict(self.infos)

    def reload(self, names: list[str] | None = None) -> dict[str, str]:
        """Open the live version of each index whose bundles moved to a new one (their CURRENT changed) and
        switch to it: calls in flight finish on the galleries they took, new calls get the new one, and the
        old one's maps are released when the last call holding it ends. A version that cannot serve (another
        checkpoint, a damaged file, another stream) is refused and the old one keeps serving. Returns, per
        index, "unchanged", "reloaded OLD -> NEW" or "refused: why"."""
        out: dict[str, str] = {}
        with self._reloading:
            for name in names or list(self.settings.indexes):
                locations = self.settings.indexes[name]
                old = self.infos[name]
                if old.backend != "bundle":
                    out[name] = "unchanged"  # a Milvus collection changes in place
                    continue
                try:
                    now = ",".join(current_version(p).name for p in locations)
                except BundleError as e:
                    out[name] = f"refused: {e}"
                    continue
                if now == old.version:
                    out[name] = "unchanged"
                    continue
                try:
                    gallery = self._open(locations)
                    info = gallery.info()
                    if info.stream != old.stream:
                        raise BundleError(f"holds stream {info.stream!r}, the index served {old.stream!r}")
                except BundleError as e:
                    out[name] = f"refused: {e}"
                    continue
                with self._swap:
                    self.galleries[name], self.infos[name] = gallery, info
                out[name] = f"reloaded {old.version} -> {info.version}"
        return out

    def delete_items(self, index: str, ids: list[str]) -> tuple[int, list[str]]:
        """Delete items by id from an index and serve the result at once: (deleted, ids not found)."""
        from index.bundle import delete_items

        if index not in self.galleries:
            raise NotFound(f"unknown index {index!r}; this server has {sorted(self.galleries)}")
        if len(ids) > MAX_DELETE_IDS:
            raise OverLimit(f"{len(ids)} ids in one call exceeds {MAX_DELETE_IDS}; split it")
        gallery, info = self.galleries[index], self.infos[index]
        if info.backend != "bundle":
            n, unknown = gallery.delete(ids)  # type: ignore[attr-defined]
            with self._swap:
                self.infos[index] = gallery.info()
            return n, [str(x) for x in unknown]
        remaining: list = list(ids)
        total = 0
        with self._reloading:  # no reload opens a half-deleted shard set
            for location in self.settings.indexes[index]:
                try:
                    _, remaining, n = delete_items(location, remaining)
                except BundleError as e:
                    raise InvalidArgument(str(e)) from None
                total += n
                if not remaining:
                    break
        self.reload([index])
        return total, [str(x) for x in remaining]

    def _default_stream(self, kind: str, wanted: str | None) -> str | None:
        streams = self.encoder_streams[kind]
        if wanted is not None and wanted not in streams:
            raise FailedPrecondition(f"{kind}_stream {wanted!r} has no {kind} encoder (configured: {streams})")
        return wanted or (streams[0] if streams else None)

    def _encoder_for(self, kind: str, stream: str) -> FeatureEncoder:
        streams = self.encoder_streams[kind]
        if not streams:
            what = "a CLIP model (encoders.clip)" if kind == "text" else "a CLIP or DINOv2 model (encoders.clip / encoders.dino)"
            raise FailedPrecondition(
                f"{kind} queries need {'an' if kind == 'image' else 'a'} {kind} encoder, and none is configured on this "
                f"server: set {what} with local "
                "weights in the service settings, or send a vector query (stream + features) instead",
            )
        stream = stream or self.default_stream[kind]
        if stream not in streams:
            raise InvalidArgument(f"no {kind} encoder feeds stream {stream!r}; {kind} encoders: {streams}")
        return self.encoders[stream]

    def _decode(self, image: bytes) -> Any:
        """A client's image decoded (a bounded number at once, under the pixel cap)."""
        with self._decoders:
            return decode_image(image, self.settings.max_image_pixels)

    def close(self) -> None:
        self.batcher.close()
        self.lane.close()

    def hold(self) -> None:
        with self._users_lock:
            self._users += 1

    def release(self) -> None:
        with self._users_lock:
            self._users -= 1
            done = self._retired and self._users == 0
        if done:
            self.close()

    def retire(self) -> None:
        """Replaced by a new deployment: close once no call holds it."""
        with self._users_lock:
            self._retired = True
            done = self._users == 0
        if done:
            self.close()

    # ---- validation -------------------------------------------------------------------------------
    def query_spec(
        self,
        kind: str | None,
        text: str = "",
        image: bytes = b"",
        stream: str = "",
        values: list[float] | np.ndarray | None = None,
        encoder_stream: str = "",
    ) -> QuerySpec:
        """Check one query (and decode an image); raises ServiceError naming what is wrong."""
        s = self.settings
        if kind is None:
            raise InvalidArgument("empty query: set exactly one of text, image or vector")
        if kind == "text":
            if not text.strip():
                raise InvalidArgument("empty text query")
            if len(text) > s.max_text_chars:
                raise InvalidArgument(f"text query of {len(text)} characters exceeds {s.max_text_chars}")
            enc = self._encoder_for("text", encoder_stream)
            return QuerySpec(enc.stream, text=text)
        if kind == "image":
            if not image:
                raise InvalidArgument("empty image query")
            if len(image) > s.max_image_bytes:
                raise InvalidArgument(f"image query of {len(image)} bytes exceeds {s.max_image_bytes}")
            enc = self._encoder_for("image", encoder_stream)
            with self._decoders:  # a bounded number of images in memory at once
                return QuerySpec(enc.stream, pixels=enc.preprocess(decode_image(image, s.max_image_pixels)))
        if encoder_stream:
            raise InvalidArgument("encoder_stream is for text and image queries; a vector names its stream")
        if not stream:
            raise InvalidArgument("vector query without a stream name")
        if stream not in self.model.cfg.streams:
            raise InvalidArgument(f"unknown stream {stream!r}; this model has {self.model.streams}")
        vec = np.asarray(values if values is not None else [], dtype=np.float32)
        dim = self.model.cfg.streams[stream]
        if vec.ndim != 1 or len(vec) != dim:
            raise InvalidArgument(f"stream {stream!r} takes {dim} values, got {vec.size}")
        if not np.isfinite(vec).all():
            raise InvalidArgument("vector contains NaN or inf")
        if float(np.abs(vec).max()) > s.max_abs_value:
            big = float(np.abs(vec).max())
            raise InvalidArgument(f"vector entry of magnitude {big:.3g} > max_abs_value {s.max_abs_value:g}")
        if not np.any(vec):
            raise InvalidArgument("vector is all zeros")
        return QuerySpec(stream, vector=vec)

    def check_search(self, spec: SearchSpec) -> None:
        """Check a search against this server: its indexes and whether they answer its path, top_k within
        max_top_k, filter latents in range, boosts within max_abs_boost (the parameters themselves were
        validated when its SearchParams was made)."""
        if not spec.indexes:
            raise InvalidArgument("no index named: set indexes to one or more of " + str(sorted(self.galleries)))
        for name in spec.indexes:
            if name not in self.galleries:
                raise NotFound(f"unknown index {name!r}; this server has {sorted(self.galleries)}")
            info = self.infos[name]
            if spec.path == SearchPath.DENSE and not info.dense:
                raise FailedPrecondition(f"index {name!r} was built without a dense index; use the sparse path")
            if spec.path == SearchPath.SEISMIC and not info.seismic:
                how = "a Milvus collection: use the sparse or approx path" if info.backend == "milvus" else "sparc index seismic"
                raise FailedPrecondition(f"index {name!r} has no Seismic index ({how})")
        p = spec.params
        if not 1 <= p.top_k <= self.settings.max_top_k:
            raise InvalidArgument(f"top_k must be in [1, {self.settings.max_top_k}], got {p.top_k}")
        n = self.model.n_latents
        for lat in [*p.require, *p.exclude, *(k for k, _ in p.boost)]:
            if not 0 <= lat < n:
                raise InvalidArgument(f"latent {lat} is out of range [0, {n})")
        for lat, w in p.boost:
            m = self.settings.max_abs_boost
            if not np.isfinite(w) or abs(w) > m:
                raise InvalidArgument(f"boost {w:g} of latent {lat} is outside [-{m:g}, {m:g}]")
        if len(set(spec.indexes)) != len(spec.indexes):
            raise InvalidArgument("an index is named more than once")

    def check_budget(self, specs: list[SearchSpec]) -> None:
        """Refuse, before any work (the server calls it before any image is decoded), a call whose hits or
        reply would exceed the per-call limits (OverLimit: never retried)."""
        s = self.settings
        hits = sum(spec.top_k * len(spec.indexes) for spec in specs)
        explained = sum(spec.top_k for spec in specs if spec.explain)
        reply = sum(spec.top_k * (HIT_BYTES + (EXPLANATION_BYTES if spec.explain else 0)) for spec in specs)
        if hits > s.max_hits_per_call:
            raise OverLimit(
                f"{len(specs)} queries x top_k x indexes = {hits} hits exceeds max_hits_per_call {s.max_hits_per_call}; "
                "split the batch or lower top_k",
            )
        if explained > s.max_explained_hits_per_call:
            raise OverLimit(
                f"{explained} explained hits exceeds max_explained_hits_per_call {s.max_explained_hits_per_call}; "
                "explain fewer hits (lower top_k) or split the batch",
            )
        if reply > s.max_message_bytes:
            raise OverLimit(
                f"the reply would be about {reply / 2**20:.1f} MiB, over max_message_bytes "
                f"({s.max_message_bytes / 2**20:.1f} MiB); split the batch or lower top_k",
            )

    # ---- work -------------------------------------------------------------------------------------
    def encode(
        self, specs: list[QuerySpec], should_stop: Callable[[], bool] | None = None, kinds: list[CodeKind] | None = None
    ) -> list[SparseCode]:
        """Codes of validated queries (query i of kind ``kinds[i]``, the search code by default: the code its
        indexes hold), through the micro-batcher. Queries of one call with the same stream, input and code
        kind go in payloads of at most ``batch_max_size`` rows, so a large batch neither jumps past the
        batch size nor holds the model thread for the whole call: other calls' queries interleave with its
        chunks, and once ``should_stop()`` turns true its remaining chunks are dropped (SearchStopped)."""
        stop = should_stop or (lambda: False)
        chunk = self.settings.batch_max_size
        codes: list[SparseCode | None] = [None] * len(specs)
        groups: dict[tuple[str, str, CodeKind], list[int]] = {}
        for i, q in enumerate(specs):
            groups.setdefault((q.stream, q.payload()[0], kinds[i] if kinds else "search"), []).append(i)
        pending = []
        for (stream, kind, code_kind), members in groups.items():
            for lo in range(0, len(members), chunk):
                part = members[lo : lo + chunk]
                parts = [specs[i].payload()[1] for i in part]
                if kind == "text":
                    payload: Any = [t for p in parts for t in p]
                elif kind == "pixels":
                    payload = torch.cat(parts)
                else:
                    payload = np.concatenate(parts)
                pending.append((part, self.batcher.submit(stream, kind, payload, stop, code_kind)))
        for members, fut in pending:
            while True:
                try:
                    code = fut.result(timeout=0.05)
                    break
                except FutureTimeout:
                    if stop():
                        raise SearchStopped("stopped while encoding: the deadline passed or the call was cancelled") from None
            for j, i in enumerate(members):
                codes[i] = SparseCode(code.indices[j : j + 1], code.values[j : j + 1], code.n_latents)
        out: list[SparseCode] = [c for c in codes if c is not None]
        for i, c in enumerate(out):
            if not torch.isfinite(c.values).all():
                raise InvalidArgument(f"query {i} overflows the encoder (its code is not finite)")
        return out

    def decode(self, code: SparseCode, stream: str) -> np.ndarray:
        if stream not in self.model.cfg.streams:
            raise InvalidArgument(f"unknown decode stream {stream!r}; this model has {self.model.streams}")
        with torch.no_grad():
            return self.model.decode(code.to(self.model.device), stream).cpu().numpy()

    def search(
        self, specs: list[SearchSpec], should_stop: Callable[[], bool] | None = None
    ) -> list[tuple[SparseCode, list[ServedHit]]]:
        """Run validated searches; requests with equal settings share one batched index call. ``should_stop``
        is polled between chunks of work: once it is true the search raises SearchStopped."""
        for spec in specs:
            self.check_search(spec)
        self.check_budget(specs)
        galleries, infos = self.served()  # this call's versions, whatever is swapped in meanwhile
        stop = should_stop or (lambda: False)
        if stop():
            raise SearchStopped("stopped before encoding: the deadline passed or the call was cancelled")
        codes = self.encode([s.query for s in specs], stop, [self.code_kind(s.indexes, infos) for s in specs])
        if stop():
            raise SearchStopped("stopped after encoding: the deadline passed or the call was cancelled")
        results: list[list[ServedHit]] = [[] for _ in specs]
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(specs):  # equal parameters: one batched index call
            groups.setdefault((tuple(s.indexes), s.params), []).append(i)
        for (indexes, params), members in groups.items():
            batch = SparseCode(
                torch.cat([codes[i].indices for i in members]),
                torch.cat([codes[i].values for i in members]),
                self.model.n_latents,
            )
            found: dict[str, SearchResult] = {}
            for name in indexes:
                try:
                    found[name] = galleries[name].search(batch, params, should_stop=should_stop)
                except GalleryUnavailable:  # its store (a Milvus server) is down: health says so until it answers
                    self.index_health(name, False)
                    raise
                self.index_health(name, True)
            for j, (i, best) in enumerate(zip(members, merge_results(found, params.top_k))):
                if should_stop is not None and j % 64 == 0 and should_stop():
                    raise SearchStopped("stopped while explaining hits")
                expl: dict[tuple[str, int], list[Any]] = {}
                for name in dict.fromkeys(g for g, _ in best) if specs[i].explain else ():  # one read per index
                    at = [p for g, p in best if g == name]
                    got = galleries[name].explain_hits(codes[i], found[name], j, at, top=8, boost=params.boost_map)
                    expl.update({(name, p): e for p, e in zip(at, got)})
                results[i] = [
                    served_hit(found[g], j, p, rank, g, expl.get((g, p), []), infos[g].version)
                    for rank, (g, p) in enumerate(best, start=1)
                ]
        return list(zip(codes, results))

    @staticmethod
    def code_kind(indexes: list[str] | tuple[str, ...], infos: dict[str, Any]) -> CodeKind:
        """The code the indexes hold (their manifests say; queries are encoded the same way); indexes that
        hold different codes cannot be searched by one query code."""
        kinds = {infos[n].manifest.code for n in indexes}
        if len(kinds) > 1:
            held = ", ".join(f"{n}: {infos[n].manifest.code}" for n in indexes)
            raise InvalidArgument(f"these indexes hold different codes ({held}): search them in separate calls")
        return kinds.pop() if kinds else "search"

    def latent_top_items(self, latent: int, index: str, top_k: int) -> tuple[int, list[tuple[Any, float]]]:
        """The items of ``index`` with the largest activation of ``latent`` (and how many it fires on)."""
        if index not in self.galleries:
            raise NotFound(f"unknown index {index!r}; this server has {sorted(self.galleries)}")
        if not 0 <= latent < self.model.n_latents:
            raise InvalidArgument(f"latent {latent} is out of range [0, {self.model.n_latents})")
        if not 1 <= top_k <= self.settings.max_top_k:
            raise InvalidArgument(f"top_k must be in [1, {self.settings.max_top_k}], got {top_k}")
        return self.served()[0][index].latent_top_items(latent, top_k)
