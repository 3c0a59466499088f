"""Latent sharding of a dictionary over a data x latent device mesh (docs/distributed.md)."""

from lightning_sae.parallel.checkpoint import consolidate_checkpoint, is_sharded_checkpoint
from lightning_sae.parallel.layers import sharded_class
from lightning_sae.parallel.sharded import LatentShard, shard_module, shard_of
from lightning_sae.parallel.strategy import LatentParallelStrategy

__all__ = [
    "LatentParallelStrategy",
    "LatentShard",
    "consolidate_checkpoint",
    "is_sharded_checkpoint",
    "shard_module",
    "shard_of",
    "sharded_class",
]
