"""One search request's parameters, typed and validated once, passed unchanged from the caller (the
service builds them from the proto in one place) down to the kernels, as faiss passes one
``SearchParameters`` object.

    params = SearchParams.create(top_k=10, path="approx", budget=0.3, require=[17])
    gallery.search(codes, params)

Each path has its own settings object: ``ExactParams`` (sparse), ``ApproxParams`` (the built-in
approximate path), ``SeismicParams`` (a bundle's Seismic index), ``DenseParams`` (FAISS). Invalid values
raise ValueError naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum


class SearchPath(str, Enum):
    """How a gallery is searched: the one place the path names are spelled (settings, the server, the client,
    the search page and the CLI take them from here; the proto's enum maps to it in ``service.wire``)."""

    SPARSE = "sparse"  # exact, posting lists
    DENSE = "dense"  # the code cross-decoded, searched with FAISS
    APPROX = "approx"  # posting lists read highest impact first up to a budget, rescored exactly
    SEISMIC = "seismic"  # Seismic's candidates, rescored exactly

    def __str__(self) -> str:
        return self.value


PATHS: tuple[str, ...] = tuple(p.value for p in SearchPath)
DEFAULT_PATH = SearchPath.SPARSE  # faster and smaller at every gallery size measured (bench/index_search.py)
DEFAULT_BUDGET = 0.5  # approximate path: share of the query's postings read (recall@10 >= 0.95 on every bench world)
DEFAULT_CANDIDATES = 300  # approximate path: rows rescored exactly (bench/index_scale.py)
MAX_CANDIDATES = 100_000


@dataclass(frozen=True)
class ExactParams:
    """The exact sparse path: nothing to set."""


@dataclass(frozen=True)
class ApproxParams:
    """The built-in approximate path: the posting lists read highest impact first up to ``budget`` (share of
    the query's postings, in (0, 1]), the best ``candidates`` rows rescored exactly."""

    budget: float = DEFAULT_BUDGET
    candidates: int = DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and 0 < self.budget <= 1):
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if not 1 <= int(self.candidates) <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be in [1, {MAX_CANDIDATES}], got {self.candidates}")


@dataclass(frozen=True)
class SeismicParams:
    """A bundle's Seismic index: the query's ``query_cut`` largest entries, ``heap_factor`` in (0, 1]
    (higher: faster, less exact); None means the bundle's default."""

    query_cut: int | None = None
    heap_factor: float | None = None

    def __post_init__(self) -> None:
        if self.heap_factor is not None and not (math.isfinite(self.heap_factor) and 0 < self.heap_factor <= 1):
            raise ValueError(f"heap_factor must be in (0, 1], got {self.heap_factor}")
        if self.query_cut is not None and self.query_cut < 0:
            raise ValueError(f"query_cut must be >= 0 (0: every entry), got {self.query_cut}")


@dataclass(frozen=True)
class DenseParams:
    """FAISS: ``nprobe`` for IVF indexes, ``ef_search`` for HNSW; None means the index's default."""

    nprobe: int | None = None
    ef_search: int | None = None


PathParams = ExactParams | ApproxParams | SeismicParams | DenseParams
_SETTINGS = {
    SearchPath.SPARSE: ExactParams, SearchPath.APPROX: ApproxParams, SearchPath.SEISMIC: SeismicParams,
    SearchPath.DENSE: DenseParams,
}  # fmt: skip


@dataclass(frozen=True)
class SearchParams:
    """What to search for and how: path, hits per query, latent filters and boosts, the path's settings.
    Frozen and hashable: requests with equal parameters share one batched search."""

    path: SearchPath = DEFAULT_PATH
    top_k: int = 10
    require: tuple[int, ...] = ()  # latents every hit has active
    exclude: tuple[int, ...] = ()  # latents no hit has active
    boost: tuple[tuple[int, float], ...] = ()  # (latent, weight added to the query's unit code), by latent
    settings: PathParams = field(default_factory=ExactParams)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"unknown search path {self.path!r} (use one of {', '.join(PATHS)})")
        object.__setattr__(self, "path", SearchPath(self.path))
        if not isinstance(self.settings, _SETTINGS[self.path]):
            raise ValueError(f"the {self.path} path takes {_SETTINGS[self.path].__name__}, got {type(self.settings).__name__}")
        if int(self.top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        object.__setattr__(self, "require", tuple(sorted({int(x) for x in self.require})))
        object.__setattr__(self, "exclude", tuple(sorted({int(x) for x in self.exclude})))
        object.__setattr__(self, "boost", tuple(sorted((int(k), float(v)) for k, v in dict(self.boost).items())))

    @classmethod
    def create(
        cls,
        top_k: int = 10,
        path: SearchPath | None = None,
        require: list[int] | tuple[int, ...] | None = None,
        exclude: list[int] | tuple[int, ...] | None = None,
        boost: dict[int, float] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        query_cut: int | None = None,
        heap_factor: float | None = None,
        budget: float | None = None,
        candidates: int | None = None,
    ) -> SearchParams:
        """Parameters from flat keywords (None: the default). Every value given is validated; the settings of
        paths other than ``path`` are then left out."""
        path = path or DEFAULT_PATH
        settings: dict[str, PathParams] = {
            SearchPath.SPARSE: ExactParams(),
            SearchPath.APPROX: ApproxParams(
                DEFAULT_BUDGET if budget is None else budget, DEFAULT_CANDIDATES if candidates is None else candidates
            ),
            SearchPath.SEISMIC: SeismicParams(query_cut, heap_factor),
            SearchPath.DENSE: DenseParams(nprobe, ef_search),
        }
        if path not in PATHS:
            raise ValueError(f"unknown search path {path!r} (use one of {', '.join(PATHS)})")
        return cls(path, top_k, tuple(require or ()), tuple(exclude or ()), tuple((boost or {}).items()), settings[path])

    @classmethod
    def of(cls, params: SearchParams | None, **options: object) -> SearchParams:
        """``params`` as given, or built from ``options`` (the keywords of ``create``) — not both."""
        if params is None:
            return cls.create(**options)  # type: ignore[arg-type]
        if options:
            raise TypeError(f"give SearchParams or keywords, not both ({sorted(options)})")
        return params

    @property
    def boost_map(self) -> dict[int, float]:
        return dict(self.boost)
