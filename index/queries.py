"""What every gallery shares: queries turned into the arrays the searches take, results, explanations, and
the merge of several galleries' results into one ranking."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from sparc_core import SparcModel, SparseCode
from sparc_core.model import CodeKind

from .errors import BundleError
from .merge import gather, merge_order
from .params import SearchParams, SearchPath


@dataclass
class Explanation:
    """One shared latent's part in a hit's score."""

    latent: int
    query_value: float
    item_value: float
    contribution: float


@dataclass
class SearchResult:
    """Top-k hits of a batch of queries: ids[q] and scores[q] are best first (shorter when fewer hits).

    Each hit also carries where it is stored, so that its explanation is read from there and not looked up
    by id: ``locs[q]`` [n, 3] int64 (shard, part, row in the shard) for local bundles; ``codes[q]`` (latent
    ids [n, w], unit values [n, w]) for a store that returns the hits' codes with them (Milvus)."""

    ids: list[list[Any]]
    scores: list[list[float]]
    path: SearchPath
    shards: list[list[int]] = field(default_factory=list)  # which shard each hit came from
    locs: list[np.ndarray] = field(default_factory=list)
    codes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


class Merged(NamedTuple):
    """One hit of a ranking over several galleries: its gallery and its position in that gallery's list."""

    gallery: str
    at: int


def unit_code(code: SparseCode) -> tuple[np.ndarray, np.ndarray]:
    """(latent ids, L2-normalised values) of a batch of codes, as numpy arrays."""
    vals = torch.nn.functional.normalize(code.values.float(), dim=1)
    return code.indices.cpu().numpy(), vals.cpu().numpy()


def encode_queries(model: SparcModel, stream: str, vectors: np.ndarray | torch.Tensor, code: CodeKind = "search") -> SparseCode:
    """The shared sparse code (of kind ``code``: the one the searched items hold) of raw feature vectors of
    ``stream`` [n, d]; a wrong stream, shape, or a row with NaN/inf raises BundleError naming it."""
    if stream not in model.cfg.streams:
        raise BundleError(f"unknown query stream {stream!r}; the model has {model.streams}")
    arr = np.asarray(vectors, dtype=np.float32)
    dim = model.cfg.streams[stream]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise BundleError(f"stream {stream!r} takes [n, {dim}] vectors, got shape {list(arr.shape)}")
    bad = np.flatnonzero(~np.isfinite(arr).all(1))
    if len(bad):
        raise BundleError(f"query row {int(bad[0])} contains NaN or inf ({len(bad)} such rows)")
    return model.encode({stream: torch.as_tensor(arr).to(model.device)}, code=code)


def as_code(model: SparcModel, query: SparseCode | tuple[str, np.ndarray], code: CodeKind = "search") -> SparseCode:
    """A query given as a code, or as (stream, raw vectors) encoded first (as a ``code`` code)."""
    return query if isinstance(query, SparseCode) else encode_queries(model, *query, code=code)


def dense_queries(model: SparcModel, gallery_stream: str, code: SparseCode) -> np.ndarray:
    """Query codes decoded into the gallery stream (cross-reconstruction), centred and unit: the dense path's
    query vectors."""
    codec = model.codecs[gallery_stream]
    decoded = model.decode(code.to(model.device), gallery_stream, "normalized") - codec.b_dec
    return torch.nn.functional.normalize(decoded.float(), dim=1).detach().cpu().numpy()


def dense_arrays(model: SparcModel, gallery_stream: str, q_idx: np.ndarray, q_val: np.ndarray) -> np.ndarray:
    """``dense_queries`` of query arrays (latent ids, weights) as ``query_arrays`` returns them."""
    code = SparseCode(torch.from_numpy(q_idx.astype(np.int64)), torch.from_numpy(q_val), model.n_latents)
    return dense_queries(model, gallery_stream, code)


def query_arrays(
    code: SparseCode, n_latents: int, require: Any, exclude: Any, boost: dict[int, float] | None
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """(latent ids, unit weights with boosts applied, required, excluded) of a batch of query codes; a latent
    out of range raises ValueError."""
    for lat in [*(require or []), *(exclude or []), *((boost or {}).keys())]:
        if not 0 <= int(lat) < n_latents:
            raise ValueError(f"latent {lat} is out of range [0, {n_latents})")
    q_idx, q_val = unit_code(code)
    if boost:
        q_idx, q_val = _boosted(q_idx, q_val, boost)
    return q_idx, q_val, sorted({int(x) for x in require or []}), sorted({int(x) for x in exclude or []})


def params_arrays(code: SparseCode, n_latents: int, params: SearchParams) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """``query_arrays`` with the filters and boosts of ``params``."""
    return query_arrays(code, n_latents, params.require, params.exclude, params.boost_map)


def _boosted(q_idx: np.ndarray, q_val: np.ndarray, boost: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    extra = np.array(sorted(boost), dtype=q_idx.dtype)
    idx = np.concatenate([q_idx, np.broadcast_to(extra, (len(q_idx), len(extra)))], axis=1)
    val = np.concatenate([q_val, np.zeros((len(q_val), len(extra)), dtype=q_val.dtype)], axis=1)
    for j, lat in enumerate(extra.tolist()):
        col = q_idx.shape[1] + j
        present = q_idx == lat
        val[:, col] = boost[lat] + np.where(present.any(1), (q_val * present).sum(1), 0.0)
        val[:, : q_idx.shape[1]][present] = 0.0
    return idx, val


def explain_code(
    query: SparseCode, item: tuple[np.ndarray, np.ndarray], top: int = 5, row: int = 0, boost: dict[int, float] | None = None
) -> list[Explanation]:
    """The shared latents that contribute most to the sparse score of an item (its stored code: latent ids,
    unit values) for query ``row``, with the query weights the search scored with (``boost`` applied): the
    contributions of all shared latents add up to the hit's sparse score (a negative boost contributes
    negatively). Largest contributions first."""
    one = SparseCode(query.indices[row : row + 1], query.values[row : row + 1], query.n_latents)
    q_idx, q_val = unit_code(one)
    if boost:
        q_idx, q_val = _boosted(q_idx, q_val, boost)
    i_idx, i_val = item
    values: dict[int, float] = {}
    for lat, v in zip(np.asarray(i_idx).tolist(), np.asarray(i_val, dtype=np.float32).tolist()):
        if v > 0:
            values[lat] = values.get(lat, 0.0) + v
    weights: dict[int, float] = {}
    for lat, qv in zip(q_idx[0].tolist(), q_val[0].tolist()):
        if qv != 0:
            weights[lat] = weights.get(lat, 0.0) + qv
    shared = [Explanation(lat, qv, values[lat], qv * values[lat]) for lat, qv in weights.items() if lat in values]
    shared.sort(key=lambda e: (-e.contribution, e.latent))
    return shared[:top]


def explain_codes(
    query: SparseCode, codes: tuple[np.ndarray, np.ndarray], top: int = 5, row: int = 0, boost: dict[int, float] | None = None
) -> list[list[Explanation]]:
    """``explain_code`` of several items at once (their stored codes: latent ids [n, w], unit values [n, w])."""
    return [explain_code(query, (i, v), top, row, boost) for i, v in zip(*codes)]


def merge_results(results: dict[str, SearchResult], top_k: int) -> list[list[Merged]]:
    """The merge over galleries: per query, the best ``top_k`` hits of several galleries' results (by name) as
    (gallery, position in its list), best first; equal scores keep the galleries' order, then each gallery's
    own order."""
    names = list(results)
    n = max((len(r.ids) for r in results.values()), default=0)
    if not names or n == 0:
        return [[] for _ in range(n)]
    width = [max((len(s) for s in results[g].scores), default=0) for g in names]
    scores = []
    for g, w in zip(names, width):
        arr = np.full((n, w), -np.inf)  # float64: the galleries' scores come back as they were
        for q, sc in enumerate(results[g].scores):
            arr[q, : len(sc)] = sc
        scores.append(arr)
    D, at = merge_order(scores, top_k)  # the one merge: galleries in order, each in the tie order
    src = gather([np.full(s.shape, g) for g, s in enumerate(scores)], at)
    pos = gather([np.broadcast_to(np.arange(s.shape[1]), s.shape) for s in scores], at)
    return [[Merged(names[s], int(p)) for d, s, p in zip(D[q], src[q], pos[q]) if np.isfinite(d)] for q in range(n)]


def merge_galleries(results: dict[str, SearchResult], top_k: int) -> list[list[tuple[float, str, Any]]]:
    """``merge_results`` as (score, gallery, id), best first."""
    return [
        [(results[g].scores[q][p], g, results[g].ids[q][p]) for g, p in best]
        for q, best in enumerate(merge_results(results, top_k))
    ]
