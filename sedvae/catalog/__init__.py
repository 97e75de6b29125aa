"""Catalog-scale inference: sharded Lightning ``predict`` with an atomic, resumable writer."""

from .module import CatalogModule
from .shards import (
    CatalogError,
    ShardDataset,
    ShardWriter,
    finished_shards,
    merge_shards,
    write_shard,
)

__all__ = [
    "CatalogError",
    "CatalogModule",
    "ShardDataset",
    "ShardWriter",
    "finished_shards",
    "merge_shards",
    "write_shard",
]
