"""What the engine takes and gives: a validated query (QuerySpec), a validated search (SearchSpec) and a
served hit (ServedHit), and what a reply costs per hit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from index import SearchParams, SearchResult

HIT_BYTES = 64  # a hit in the reply: id, score, rank, index name, framing (ids of up to ~40 characters)
EXPLANATION_BYTES = 8 * 24  # the 8 shared latents of an explained hit


@dataclass
class QuerySpec:
    """A validated query: its stream and exactly one payload (features, a text, or preprocessed pixels)."""

    stream: str
    vector: np.ndarray | None = None  # [d] raw features of ``stream``
    text: str | None = None  # for the stream's text encoder
    pixels: torch.Tensor | None = None  # [3, H, W] preprocessed for the stream's image encoder

    def payload(self) -> tuple[str, Any]:
        """(kind, one-row payload) for the encode batcher."""
        if self.text is not None:
            return "text", [self.text]
        if self.pixels is not None:
            return "pixels", self.pixels[None]
        return "vector", self.vector[None, :]


@dataclass
class SearchSpec:
    """A validated search request: the query, the indexes, how to search them (one SearchParams, passed
    unchanged to every gallery) and what to attach to the reply."""

    query: QuerySpec
    indexes: list[str]
    params: SearchParams = field(default_factory=SearchParams)
    explain: bool = False
    return_code: bool = False

    @property
    def top_k(self) -> int:
        return self.params.top_k

    @property
    def path(self) -> str:
        return self.params.path


@dataclass
class ServedHit:
    id: Any
    score: float
    rank: int
    index: str
    explanation: list[Any]
    version: str = ""  # the version of its index that answered
    loc: tuple[int, int, int] | None = None  # (shard, part, row in the shard) in a local bundle; None elsewhere


def served_hit(result: SearchResult, q: int, at: int, rank: int, index: str, explanation: list[Any], version: str) -> ServedHit:
    """Hit ``at`` of query ``q`` of one index's result, with where it is stored (local bundles say)."""
    loc = tuple(result.locs[q][at].tolist()) if result.locs else None
    return ServedHit(result.ids[q][at], result.scores[q][at], rank, index, explanation, version, loc)  # type: ignore[arg-type]
