"""``open_gallery``: the gallery for a location, local bundle directories or one Milvus collection."""

from __future__ import annotations

from pathlib import Path

from sparc_core import SparcModel

from .errors import BundleError
from .gallery import Gallery
from .searcher import Searcher


def open_gallery(
    locations: list[str] | str,
    model: SparcModel,
    use_gpu: bool | None = None,
    gpus: list[int] | None = None,
    shard_gpus: bool = False,
    checkpoint_sha256: str | None = None,
) -> Gallery:
    """A gallery over bundle directories (a Searcher) or one Milvus collection (milvus://, milvus-lite:).
    ``gpus`` / ``shard_gpus``: where the bundles' dense indexes live (see Searcher); ``checkpoint_sha256``:
    the serving checkpoint's hash, which the bundles (or the collection) must record."""
    locations = [locations] if isinstance(locations, (str, Path)) else list(locations)
    if any(str(x).startswith(("milvus://", "milvus-lite:")) for x in locations):
        if len(locations) != 1:
            raise BundleError("a Milvus index is one collection: give one milvus:// location (Milvus shards it itself)")
        from .milvus_backend import MilvusSearcher

        return MilvusSearcher(str(locations[0]), model, checkpoint_sha256=checkpoint_sha256)
    return Searcher(
        locations, model=model, use_gpu=use_gpu, gpus=gpus, shard_gpus=shard_gpus, checkpoint_sha256=checkpoint_sha256
    )
