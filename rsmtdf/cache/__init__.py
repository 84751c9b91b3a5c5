"""The teacher feature cache: its identity (`identity`), the store written shard by shard (`store`),
targets read back (`reader`, `shardfile` for local shard files), how values are stored (`format`)
and the verification that finds damaged shards (`verify`)."""

from .identity import Identity
from .reader import CacheReader
from .store import FeatureCache

__all__ = ["CacheReader", "FeatureCache", "Identity"]
