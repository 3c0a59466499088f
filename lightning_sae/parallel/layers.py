"""Which sharded layer each variant gets, and putting it on a module.

The layers themselves (the sharded maths) are in ``parallel/sharded.py`` (SAEs, transcoders,
crosscoders) and ``parallel/sharded_clt.py`` (cross-layer transcoders); this table joins them.
"""

from __future__ import annotations

from lightning_sae.models.approx_l0 import ApproxL0SAE
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.clt import (
    BatchTopKCrossLayerTranscoder,
    CrossLayerTranscoder,
    JumpReLUCrossLayerTranscoder,
    TopKCrossLayerTranscoder,
)
from lightning_sae.models.gated import GatedSAE
from lightning_sae.models.jumprelu import JumpReLUSAE
from lightning_sae.models.matryoshka import MatryoshkaSAE
from lightning_sae.models.standard import StandardSAE
from lightning_sae.models.topk import BatchTopKSAE, TopKSAE
from lightning_sae.models.transcoder import (
    BatchTopKCrossCoder,
    BatchTopKSkipTranscoder,
    BatchTopKTranscoder,
    CrossCoder,
    JumpReLUSkipTranscoder,
    JumpReLUTranscoder,
    SkipTranscoder,
    TopKCrossCoder,
    TopKSkipTranscoder,
    TopKTranscoder,
    Transcoder,
)
from lightning_sae.parallel.sharded import (
    ShardedApproxL0,
    ShardedBatchTopK,
    ShardedGated,
    ShardedJumpReLU,
    ShardedMatryoshka,
    ShardedSAE,
    ShardedStandard,
    ShardedTopK,
    check_latent_split,
)
from lightning_sae.parallel.sharded_clt import (
    ShardedBatchTopKCLT,
    ShardedCLT,
    ShardedJumpReLUCLT,
    ShardedTopKCLT,
)

# The layer of each shipped variant, by exact class: a subclass from elsewhere may override
# what the layer relies on, so it is refused rather than assumed.
LAYERS: dict[type[SparseAutoencoder], type[ShardedSAE]] = {
    SparseAutoencoder: ShardedSAE,
    StandardSAE: ShardedStandard,
    TopKSAE: ShardedTopK,
    BatchTopKSAE: ShardedBatchTopK,
    MatryoshkaSAE: ShardedMatryoshka,
    JumpReLUSAE: ShardedJumpReLU,
    GatedSAE: ShardedGated,
    ApproxL0SAE: ShardedApproxL0,
    # Transcoders and crosscoders: the variant's layer. Their mixins change what is read and
    # scored (sites, per-site scales, W_skip x, per-layer decoder norms), all replicated or
    # local to a member's latents; the steps above score against input_and_target's target.
    Transcoder: ShardedStandard,
    SkipTranscoder: ShardedStandard,
    TopKTranscoder: ShardedTopK,
    TopKSkipTranscoder: ShardedTopK,
    BatchTopKTranscoder: ShardedBatchTopK,
    BatchTopKSkipTranscoder: ShardedBatchTopK,
    JumpReLUTranscoder: ShardedJumpReLU,
    JumpReLUSkipTranscoder: ShardedJumpReLU,
    CrossCoder: ShardedStandard,
    TopKCrossCoder: ShardedTopK,
    BatchTopKCrossCoder: ShardedBatchTopK,
    # Cross-layer transcoders (parallel/sharded_clt.py).
    CrossLayerTranscoder: ShardedCLT,
    JumpReLUCrossLayerTranscoder: ShardedJumpReLUCLT,
    TopKCrossLayerTranscoder: ShardedTopKCLT,
    BatchTopKCrossLayerTranscoder: ShardedBatchTopKCLT,
}
_CLASSES: dict[type, type] = {}


def sharded_class(cls: type) -> type:
    """``LatentSharded<cls>``: the layer of ``cls`` in front of ``cls`` (made once per class)."""
    if cls in _CLASSES.values():
        return cls
    if cls not in LAYERS:
        raise ValueError(
            f"{cls.__name__} cannot be latent-sharded: only lightning-sae's own classes "
            f"({', '.join(c.__name__ for c in LAYERS)}) have a sharded layer. Set "
            "trainer.latent_parallel: 1 (plain DDP) for this model."
        )
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LatentSharded{cls.__name__}", (LAYERS[cls], cls), {})
    return _CLASSES[cls]


def check_shardable(module: SparseAutoencoder, latent_parallel: int) -> None:
    """Bad input, before any process group work: clear errors naming the option to change."""
    sharded_class(type(module))
    check_latent_split(module, latent_parallel)
