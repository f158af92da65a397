"""Milvus as the distributed backend: export a bundle into a collection and search it like a local bundle.

A collection holds, per item: the id (primary key), the sparse code (SPARSE_FLOAT_VECTOR, latent id ->
unit value, inner-product metric), the active latents (ARRAY<INT32>, so latent filters run inside Milvus)
and optionally the cross-decodable dense vector. The bundle's manifest is stored in the collection's
properties (checkpoint hash, stream, n_latents, k), so a collection built from another checkpoint is
refused exactly as a local bundle is, and the ids of the bundle's first part (its lineage) too, so exporting
another bundle into a collection is refused (or, with ``replace``, replaces it) instead of mixing items. The
same client reaches a Milvus cluster (``milvus://HOST:PORT/NAME``, ``?db_name=DB&secure=true`` for a
database and TLS, token in ``MILVUS_TOKEN``) or the embedded milvus-lite (``milvus-lite:PATH.db/NAME``):
only the URI changes. Every call has a timeout; a Milvus that cannot be reached is ``GalleryUnavailable``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from sparc_core import SparcModel, SparseCode
from sparc_core.extras import require

from .errors import BundleError, GalleryUnavailable, SearchStopped
from .gallery import ExplainsFromCodes, GalleryInfo
from .manifest import Manifest, require_checkpoint, require_model
from .merge import merge_order
from .params import ApproxParams, DenseParams, SearchParams, SearchPath
from .queries import SearchResult, as_code, dense_arrays, encode_queries, params_arrays
from .reader import Bundle

__all__ = ["GalleryUnavailable", "MilvusSearcher", "MilvusTarget", "check_index_type", "export_bundle", "is_milvus"]


SCHEME, LITE_SCHEME = "milvus://", "milvus-lite:"
LITE_REFUSED = ("GPU_", "DISKANN", "SCANN")  # accepted by milvus-lite but not built by it
MAX_STR_ID = 1024  # VARCHAR length of string ids
QUERY_CHUNK = 64  # queries per Milvus search call (between checks of should_stop)
CALL_TIMEOUT = float(os.environ.get("SPARC_MILVUS_TIMEOUT", "10"))  # seconds per Milvus call (at most)
MAX_LIMIT = 16_384  # the most hits Milvus returns per query


def is_milvus(location: str) -> bool:
    """Whether an index location names a Milvus collection rather than a bundle directory."""
    return str(location).startswith((SCHEME, LITE_SCHEME))


@dataclass
class MilvusTarget:
    """Where a collection lives: a server URI (or a milvus-lite file) and the collection name."""

    uri: str
    collection: str
    embedded: bool
    db_name: str = ""

    @classmethod
    def parse(cls, location: str) -> MilvusTarget:
        if location.startswith(SCHEME):
            from urllib.parse import parse_qs

            rest, _, query = location[len(SCHEME) :].partition("?")
            host, sep, coll = rest.partition("/")
            if not host or not sep or not coll or "/" in coll:
                raise BundleError(f"{location!r}: expected milvus://HOST:PORT/COLLECTION[?db_name=DB&secure=true]")
            opts = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
            unknown = set(opts) - {"db_name", "secure"}
            if unknown:
                raise BundleError(f"{location!r}: unknown option(s) {sorted(unknown)} (db_name, secure)")
            secure = opts.get("secure", "false").lower() in ("1", "true", "yes")
            return cls(f"{'https' if secure else 'http'}://{host}", coll, embedded=False, db_name=opts.get("db_name", ""))
        if location.startswith(LITE_SCHEME):
            rest = location[len(LITE_SCHEME) :]
            path, sep, coll = rest.rpartition("/")
            if not sep or not path or not coll:
                raise BundleError(f"{location!r}: expected milvus-lite:PATH/COLLECTION (PATH a .db file)")
            if not path.endswith(".db"):
                raise BundleError(f"{location!r}: the milvus-lite file must end in .db, got {path!r}")
            return cls(path, coll, embedded=True)
        raise BundleError(f"{location!r}: not a Milvus location (milvus://HOST:PORT/NAME or milvus-lite:PATH.db/NAME)")

    def client(self) -> Any:
        MilvusClient = require(
            "pymilvus", "milvus", "Milvus indexes", BundleError, " (it brings milvus-lite for milvus-lite: locations)"
        ).MilvusClient

        kw: dict[str, Any] = {"uri": self.uri}
        if not self.embedded:
            token = os.environ.get("MILVUS_TOKEN", "")  # user:password or an API key; never on the command line
            kw |= {"token": token} if token else {}
            kw |= {"db_name": self.db_name} if self.db_name else {}
            kw["timeout"] = CALL_TIMEOUT
        try:
            return MilvusClient(**kw)
        except Exception as e:  # noqa: BLE001 - pymilvus raises its own and grpc's errors
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GalleryUnavailable(f"cannot reach Milvus at {self.uri}: {text}") from None


def check_index_type(index_type: str, embedded: bool) -> None:
    """Refuse dense index types that milvus-lite accepts but does not build."""
    if embedded and index_type.upper().startswith(LITE_REFUSED):
        raise BundleError(
            f"index type {index_type!r} is not built by embedded milvus-lite (it would silently fall back); "
            "use FLAT, IVF_FLAT or HNSW here, or a Milvus server for GPU_*, DISKANN and SCANN"
        )


def _identity(m: Manifest) -> dict[str, str]:
    return {
        "sparc.checkpoint_sha256": m.checkpoint_sha256,
        "sparc.stream": m.stream,
        "sparc.n_latents": str(m.n_latents),
        "sparc.k": str(m.k),
        "sparc.id_kind": m.id_kind,
    }


def _lineage(bundle: Bundle) -> str:
    """The identity of a bundle's items across `index add`: a hash of its first part's ids (appending adds
    parts and never changes the first one; another bundle has other ids)."""
    first = bundle.parts[0]
    h = hashlib.sha256(str(bundle.manifest.id_kind).encode())
    for a in range(0, first.n_items, 65_536):
        rows = np.arange(first.row0 + a, first.row0 + min(first.n_items, a + 65_536))
        h.update("\n".join(map(str, bundle.ids_at(rows))).encode())
    return h.hexdigest()


def _rows(bundle: Bundle, start: int, stop: int, dense: bool) -> list[dict[str, Any]]:
    rows = np.arange(start, stop)
    rows = rows[bundle.alive_at(rows)]  # deleted items are not exported (and deleted from the collection)
    idx, val = bundle.codes(rows)
    ids = bundle.ids_at(rows)
    vectors = _dense_vectors(bundle, rows) if dense else None
    out = []
    for r in range(len(rows)):
        on = val[r] > 0
        lat = idx[r][on].tolist()
        item = {"id": ids[r], "code": dict(zip(lat, val[r][on].tolist())), "latents": lat}
        if vectors is not None:
            item["dense"] = vectors[r].tolist()
        out.append(item)
    return out


def _dense_vectors(bundle: Bundle, rows: np.ndarray) -> np.ndarray:
    out = np.zeros((len(rows), bundle.manifest.dim), dtype=np.float32)
    for part, sel, local in bundle._split(rows):
        out[sel] = part.dense_index.reconstruct_n(int(local[0]), len(local))
    return out


def export_bundle(
    bundle_path: str,
    location: str,
    batch: int = 5_000,
    dense_index: str | None = None,
    progress: bool = True,
    replace: bool = False,
) -> int:
    """Export a bundle into a Milvus collection (created if absent); resumes an interrupted export, and after
    `index add` exports only the new items (the collection's manifest and item count follow the bundle).

    Every batch is upserted, so a batch written twice (an interrupted export on a cluster with bounded
    staleness) never duplicates a primary key. A collection holding another bundle's items (other
    checkpoint, stream, shape or ids) is refused; ``replace`` drops it and exports this bundle instead.
    ``dense_index``: also export the dense vectors with this Milvus index type (FLAT, HNSW, IVF_FLAT...;
    the bundle must hold an exact Flat dense index to read them from). Returns the items written now.
    """
    target = MilvusTarget.parse(location)
    b = Bundle(bundle_path)
    m = b.manifest
    if dense_index is not None:
        check_index_type(dense_index, target.embedded)
        if not m.dense or (m.faiss_factory or "Flat") != "Flat":
            raise BundleError(f"{bundle_path}: dense export needs a bundle built with the exact Flat dense index")
    if m.id_kind == "str":
        longest = max((len(str(x).encode()) for x in b.all_ids()), default=0)
        if longest > MAX_STR_ID:
            raise BundleError(f"{bundle_path}: an id is {longest} bytes long; Milvus string ids here hold at most {MAX_STR_ID}")
    client = target.client()
    name = target.collection
    lineage = _lineage(b)
    meta = _identity(m) | {"sparc.manifest": m.model_dump_json(exclude={"files"}), "sparc.n_items": str(m.n_items),
                           "sparc.lineage": lineage}  # fmt: skip
    if client.has_collection(name):
        props = client.describe_collection(name).get("properties", {})
        try:
            _check_identity(props, m, location)
            if props.get("sparc.lineage", "") != lineage:
                raise BundleError(
                    f"{location}: holds the items of another bundle (other ids); export into another collection, "
                    "or replace it (--replace)"
                )
            has_dense = props.get("sparc.dense", "") != ""
            if (dense_index is not None) != has_dense:
                raise BundleError(f"{location}: the collection was {'' if has_dense else 'not '}exported with dense vectors")
        except BundleError:
            if not replace:
                raise
            client.drop_collection(name)
            _create(client, name, m, dense_index, meta)
    else:
        _create(client, name, m, dense_index, meta)
    start = _resume_point(client, name, b, batch)
    written = 0
    client.alter_collection_properties(name, properties={"sparc.complete": "0"})
    with tqdm(total=m.n_items, initial=start, desc=f"export to {name}", unit="item", disable=not progress) as bar:
        for a in range(start, m.n_items, batch):
            stop = min(m.n_items, a + batch)
            client.upsert(name, _rows(b, a, stop, dense_index is not None))  # idempotent: never a duplicate key
            written += stop - a
            bar.update(stop - a)
    gone = b.deleted_ids()  # items deleted from the bundle since an earlier export: deleted here too
    for a in range(0, len(gone), batch):
        client.delete(name, ids=gone[a : a + batch])
    client.flush(name)
    # the collection now holds exactly this bundle: its manifest and item count follow it (after `index add` too)
    client.alter_collection_properties(name, properties=meta | {"sparc.complete": "1"})
    return written


def _create(client: Any, name: str, m: Manifest, dense_index: str | None, meta: dict[str, str]) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, description=f"sparc codes of stream {m.stream}")
    if m.id_kind == "int":
        schema.add_field("id", DataType.INT64, is_primary=True)
    else:
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_STR_ID)
    schema.add_field("code", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("latents", DataType.ARRAY, element_type=DataType.INT32, max_capacity=max(1, m.k))
    params = client.prepare_index_params()
    params.add_index(field_name="code", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    if dense_index is not None:
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=m.dim)
        params.add_index(field_name="dense", index_type=dense_index.upper(), metric_type="IP")
    props = meta | {"sparc.dense": dense_index.upper() if dense_index else ""}
    client.create_collection(name, schema=schema, index_params=params, properties=props)


def _check_identity(props: dict[str, Any], m: Manifest, location: str) -> None:
    want = _identity(m)
    for key, value in want.items():
        if str(props.get(key, "")) != value:
            raise BundleError(
                f"{location}: holds {key.split('.', 1)[1]}={props.get(key, '?')!s:.12}, this bundle has {value:.12}; "
                "export into another collection (or drop this one)"
            )


def _resume_point(client: Any, name: str, b: Bundle, batch: int) -> int:
    """The first row of the first batch not known to be in the collection (batches go in in row order)."""
    n_batches = -(-b.manifest.n_items // batch)

    def present(i: int) -> bool:
        last = min(b.manifest.n_items, (i + 1) * batch) - 1
        return bool(client.get(name, ids=[b.id_at(last)], output_fields=["id"]))

    lo, hi = 0, n_batches  # batches [0, lo) are present; find the first absent one
    while lo < hi:
        mid = (lo + hi) // 2
        if present(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo * batch


def _delete_keys(client: Any, coll: str, id_kind: str, ids: Any) -> tuple[int, list[Any], list[Any]]:
    """Delete ids (converted to the collection's key type) that exist: (deleted, not found, deleted keys)."""
    try:
        keys = [int(x) for x in ids] if id_kind == "int" else [str(x) for x in ids]
    except (TypeError, ValueError):
        raise BundleError(f"{coll}: ids are integers; got {list(ids)[:3]}") from None
    keys = list(dict.fromkeys(keys))
    present: set[Any] = set()
    for a in range(0, len(keys), 1000):
        present |= {g["id"] for g in client.get(coll, ids=keys[a : a + 1000], output_fields=["id"], timeout=CALL_TIMEOUT)}
    found = [k for k in keys if k in present]
    for a in range(0, len(found), 1000):
        client.delete(coll, ids=found[a : a + 1000], timeout=CALL_TIMEOUT)
    client.flush(coll)
    return len(found), [k for k in keys if k not in present], found


def delete_from_collection(location: str, ids: Any) -> tuple[int, list[Any]]:
    """Delete items by id from an exported collection (no model needed): (deleted, ids not found)."""
    target = MilvusTarget.parse(location)
    client = target.client()
    name = target.collection
    if not client.has_collection(name):
        raise BundleError(f"{location}: no such collection")
    props = client.describe_collection(name).get("properties", {})
    if "sparc.manifest" not in props:
        raise BundleError(f"{location}: not a sparc collection (no sparc.manifest property)")
    id_kind = json.loads(props["sparc.manifest"]).get("id_kind", "int")
    n, unknown, _ = _delete_keys(client, name, id_kind, ids)
    return n, unknown


class MilvusSearcher(ExplainsFromCodes):
    """Search a Milvus collection with the Searcher API: encode the query, let Milvus rank by inner product
    over the sparse code (or the dense vector), filters inside Milvus, explanations from the returned codes."""

    def __init__(self, location: str, model: SparcModel, checkpoint_sha256: str | None = None) -> None:
        """``checkpoint_sha256``: the serving checkpoint's hash; a collection exported from another
        checkpoint is refused (the same check a local bundle gets)."""
        self.location = location
        self.target = MilvusTarget.parse(location)
        self.client = self.target.client()
        name = self.target.collection
        exists = self._call(lambda: self.client.has_collection(name))
        props = self._call(lambda: self.client.describe_collection(name).get("properties", {})) if exists else None
        if props is None:
            raise BundleError(f"{location}: no such collection (export one with `sparc index export`)")
        if "sparc.manifest" not in props:
            raise BundleError(f"{location}: not a sparc collection (no sparc.manifest property)")
        self.manifest = Manifest.model_validate(json.loads(props["sparc.manifest"]) | {"files": {}})
        _check_identity(props, self.manifest, location)
        if checkpoint_sha256 is not None:
            require_checkpoint(self.manifest.checkpoint_sha256, checkpoint_sha256, location, made="exported from",
                               remedy="export the bundle built with this checkpoint")  # fmt: skip
        if props.get("sparc.complete") != "1":
            raise BundleError(f"{location}: its export did not finish; run `sparc index export` again to complete it")
        self._call(lambda: self.client.load_collection(name))
        self.dense_type = props.get("sparc.dense", "")
        self.model = model
        self.stream = self.manifest.stream
        self._count: int | None = None
        if model.n_latents != self.manifest.n_latents or self.stream not in model.streams:
            raise BundleError(
                f"{location}: holds stream {self.stream!r} with {self.manifest.n_latents} latents; the model does not match"
            )
        require_model(self.manifest, model, location, checkpoint_sha256)  # the check a local bundle gets

    def _call(self, fn: Callable[[], Any]) -> Any:
        """One Milvus round trip; connection failures and timeouts become GalleryUnavailable."""
        try:
            return fn()
        except (BundleError, SearchStopped, KeyError, ValueError):
            raise
        except Exception as e:  # noqa: BLE001 - pymilvus raises its own and grpc's errors
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GalleryUnavailable(f"{self.location}: Milvus did not answer ({text})") from None

    @property
    def n_items(self) -> int:
        if self._count is None:
            got = self._call(lambda: self.client.query(self.target.collection, filter="", output_fields=["count(*)"],
                                                       timeout=CALL_TIMEOUT))  # fmt: skip
            self._count = int(got[0]["count(*)"])
        return self._count

    def delete(self, ids: Any) -> tuple[int, list[Any]]:
        """Delete items by primary key; (how many were deleted, the ids not found)."""
        n, unknown, _ = self._call(lambda: _delete_keys(self.client, self.target.collection, self.manifest.id_kind, ids))
        self._count = None
        return n, unknown

    def info(self) -> GalleryInfo:
        return GalleryInfo(self.stream, self.n_items, 1, self.manifest, bool(self.dense_type), False, backend="milvus")

    def encode(self, stream: str, vectors: np.ndarray) -> SparseCode:
        return encode_queries(self.model, stream, vectors, self.manifest.code)

    def search(
        self,
        query: SparseCode | tuple[str, np.ndarray],
        params: SearchParams | None = None,
        should_stop: Callable[[], bool] | None = None,
        **options: Any,
    ) -> SearchResult:
        """Top-k items per query, as ``Searcher.search`` (filters are Milvus array filters). "sparse" is
        Milvus's exact sparse search; "approx" maps to its sparse index's drop ratio (the smallest
        1 - ``budget`` of the query's entries are dropped at search time); "seismic" is refused (a Milvus
        collection has no Seismic index); "dense" searches the exported dense vectors."""
        params = SearchParams.of(params, **options)
        code = as_code(self.model, query, self.manifest.code)
        path, settings, top_k = params.path, params.settings, params.top_k
        if path == SearchPath.SEISMIC:
            raise BundleError(f"{self.location}: a Milvus collection has no Seismic index; use the sparse or approx path")
        drop = 1.0 - settings.budget if isinstance(settings, ApproxParams) else 0.0
        if path == SearchPath.DENSE and not self.dense_type:
            raise BundleError(f"{self.location}: exported without dense vectors; use the sparse path")
        q_idx, q_val, require_l, exclude_l = params_arrays(code, self.model.n_latents, params)
        expr = _filter_expr(require_l, exclude_l)
        ids, scores, codes = [], [], []
        for a in range(0, len(q_idx), QUERY_CHUNK):
            if should_stop is not None and should_stop():
                raise SearchStopped("search stopped: the caller's deadline passed or it was cancelled")
            qi, qv = q_idx[a : a + QUERY_CHUNK], q_val[a : a + QUERY_CHUNK]
            rescore = path in (SearchPath.SPARSE, SearchPath.APPROX) and bool((qv < 0).any())
            if path in (SearchPath.SPARSE, SearchPath.APPROX):
                # Milvus takes positive weights; a negative one (a boost) enters the rescoring (_negatives_rescored)
                data = [{int(j): float(v) for j, v in zip(i, w) if v > 0} for i, w in zip(qi, qv)]
                params: dict[str, Any] = {"metric_type": "IP", "params": {"drop_ratio_search": drop}}
                field = "code"
            else:
                assert isinstance(settings, DenseParams)
                data = [row.tolist() for row in dense_arrays(self.model, self.stream, qi, qv)]
                extra = {"nprobe": settings.nprobe} if settings.nprobe else {}
                extra |= {"ef": max(settings.ef_search, top_k)} if settings.ef_search else {}
                params, field = {"metric_type": "IP", "params": extra}, "dense"

            def search(limit: int, data: list = data, field: str = field, params: dict = params) -> list:
                return self._call(lambda: self.client.search(
                    self.target.collection, data=data, anns_field=field, limit=limit, filter=expr, output_fields=["code"],
                    search_params=params, timeout=CALL_TIMEOUT))  # fmt: skip

            found = _negatives_rescored(search, qi, qv, top_k) if rescore else search(top_k)
            for hits in found:
                kept = [h for h in hits if field != "code" or h["distance"] > 0]  # no shared latent: not a hit
                ids.append([h["id"] for h in kept])
                scores.append([float(h["distance"]) for h in kept])
                codes.append(_code_arrays([h["entity"]["code"] for h in kept], self.manifest.k))
        return SearchResult(ids=ids, scores=scores, path=path, shards=[[0] * len(r) for r in ids], codes=codes)

    def item_code(self, item_id: Any) -> tuple[np.ndarray, np.ndarray]:
        """An item's stored code (latent ids, unit values)."""
        key = int(item_id) if self.manifest.id_kind == "int" else str(item_id)
        coll = self.target.collection
        got = self._call(lambda: self.client.get(coll, ids=[key], output_fields=["code"], timeout=CALL_TIMEOUT))
        if not got:
            raise KeyError(f"item {item_id!r} is not in this index")
        idx, val = _code_arrays([got[0]["code"]], self.manifest.k)
        return idx[0], val[0]

    def hit_codes(self, result: SearchResult, q: int, hits: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The stored codes of hits ``hits`` (positions in query ``q``'s list), as the search returned them."""
        at = np.asarray(hits, dtype=np.int64)
        idx, val = result.codes[q]
        return idx[at], val[at]

    def latent_top_items(self, latent: int, top_k: int) -> tuple[int, list[tuple[Any, float]]]:
        """Items with the largest value of ``latent`` (a one-hot query) and how many items have it active."""
        found = self._call(lambda: self.client.search(
            self.target.collection, data=[{int(latent): 1.0}], anns_field="code", limit=top_k,
            filter=f"array_contains(latents, {int(latent)})",
            search_params={"metric_type": "IP", "params": {"drop_ratio_search": 0.0}}, timeout=CALL_TIMEOUT))  # fmt: skip
        top = [(h["id"], float(h["distance"])) for h in found[0]]
        count = self._call(lambda: self.client.query(self.target.collection, filter=f"array_contains(latents, {int(latent)})",
                                                     output_fields=["count(*)"], timeout=CALL_TIMEOUT))  # fmt: skip
        return int(count[0]["count(*)"]), top


def _negatives_rescored(search: Callable[[int], list], q_idx: np.ndarray, q_val: np.ndarray, top_k: int) -> list[list[dict]]:
    """Exact top-k of queries with negative weights, which Milvus refuses: candidates by the positive weights
    (``search(limit)``), rescored with the whole query. An item not returned scores at most the last
    candidate's positive score, so once the k-th rescored hit reaches it the answer is exact; until then
    (or until every candidate or Milvus's limit is reached) the limit grows fourfold."""
    limit = min(4 * top_k, MAX_LIMIT)
    while True:
        found = search(limit)
        out, settled = [], True
        for r, hits in enumerate(found):
            best = [h for h in _rescored(hits, q_idx[r], q_val[r], top_k) if h["distance"] > 0]
            if len(hits) == limit and (len(best) < top_k or best[-1]["distance"] < hits[-1]["distance"]):
                settled = False  # a candidate not returned might still beat the k-th
            out.append(best)
        if settled or limit >= MAX_LIMIT:
            return out
        limit = min(4 * limit, MAX_LIMIT)


def _rescored(hits: list[dict], q_idx: np.ndarray, q_val: np.ndarray, top_k: int) -> list[dict]:
    """Hits rescored with the whole query (negative weights too) from the codes that came with them: the
    ``top_k`` best, score descending (ties in Milvus's order)."""
    weight: dict[int, float] = {}
    for j, v in zip(q_idx.tolist(), q_val.tolist()):
        if v != 0:
            weight[int(j)] = weight.get(int(j), 0.0) + float(v)
    scores = np.array(
        [np.float32(sum(weight.get(int(j), 0.0) * float(v) for j, v in h["entity"]["code"].items())) for h in hits],
        dtype=np.float64,
    ).reshape(1, -1)
    D, at = merge_order([scores], top_k, keys=[np.arange(len(hits))[None, :]])  # the one merge; ties: Milvus's order
    return [{**hits[int(a)], "distance": float(d)} for d, a in zip(D[0], at[0]) if a >= 0]


def _code_arrays(codes: list[dict[int, float]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Milvus sparse vectors ({latent: value}) as stored-code arrays: latent ids int64 [n, w], unit values
    float32 [n, w] (w = max(k, the longest), padded with value 0), latents ascending."""
    w = max([k, *(len(c) for c in codes)])
    idx, val = np.zeros((len(codes), w), dtype=np.int64), np.zeros((len(codes), w), dtype=np.float32)
    for r, code in enumerate(codes):
        lat = sorted(int(j) for j in code)
        idx[r, : len(lat)] = lat
        val[r, : len(lat)] = [code[j] for j in lat]
    return idx, val


def _filter_expr(require: list[int], exclude: list[int]) -> str:
    parts = []
    if require:
        parts.append(f"array_contains_all(latents, {require})")
    if exclude:
        parts.append(f"not array_contains_any(latents, {exclude})")
    return " and ".join(parts)
