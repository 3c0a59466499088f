"""lightning-sae: sparse autoencoders on transformer activations, trained with PyTorch Lightning.

Train from Python without YAML::

    import lightning as L
    from lightning_sae import TopKSAE, ToySuperpositionDataModule, DecoderNormConstraint

    sae = TopKSAE(d_in=256, d_sae=512, k=8)
    L.Trainer(max_steps=500, callbacks=[DecoderNormConstraint()]).fit(
        sae, datamodule=ToySuperpositionDataModule(n_features=512, d_in=256)
    )

The names below are imported on first use, so that ``import lightning_sae`` (and the
command line's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "SparseAutoencoder",
            "StandardSAE",
            "TopKSAE",
            "BatchTopKSAE",
            "MatryoshkaSAE",
            "JumpReLUSAE",
            "GatedSAE",
            "ApproxL0SAE",
        ),
        "lightning_sae.models",
    ),
    **dict.fromkeys(
        (
            "Transcoder",
            "SkipTranscoder",
            "TopKTranscoder",
            "TopKSkipTranscoder",
            "BatchTopKTranscoder",
            "BatchTopKSkipTranscoder",
            "JumpReLUTranscoder",
            "JumpReLUSkipTranscoder",
            "CrossCoder",
            "TopKCrossCoder",
            "BatchTopKCrossCoder",
        ),
        "lightning_sae.models.transcoder",
    ),
    **dict.fromkeys(
        (
            "CrossLayerTranscoder",
            "JumpReLUCrossLayerTranscoder",
            "TopKCrossLayerTranscoder",
            "BatchTopKCrossLayerTranscoder",
        ),
        "lightning_sae.models.clt",
    ),
    "SAEGroup": "lightning_sae.models.group",
    "ActivationDataModule": "lightning_sae.data.activations",
    "StreamingActivationDataModule": "lightning_sae.data.stream",
    "ToySuperpositionDataModule": "lightning_sae.data.toy",
    "DecoderNormConstraint": "lightning_sae.callbacks.decoder_norm",
    "DeadFeatureResampler": "lightning_sae.callbacks.resampling",
    "DataInformedInit": "lightning_sae.callbacks.init",
    "FeatureDensityMonitor": "lightning_sae.callbacks.density",
    "FeatureGeometryMonitor": "lightning_sae.callbacks.geometry",
    "DownstreamEval": "lightning_sae.callbacks.downstream",
    "load": "lightning_sae.io",
    "export_sae": "lightning_sae.io",
    "export_checkpoint": "lightning_sae.io",
    "compare_saes": "lightning_sae.metrics.similarity",
    "LatentParallelStrategy": "lightning_sae.parallel",
    "consolidate_checkpoint": "lightning_sae.parallel",
}
__all__ = [
    "__version__",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "MatryoshkaSAE",
    "JumpReLUSAE",
    "GatedSAE",
    "ApproxL0SAE",
    "Transcoder",
    "SkipTranscoder",
    "TopKTranscoder",
    "TopKSkipTranscoder",
    "BatchTopKTranscoder",
    "BatchTopKSkipTranscoder",
    "JumpReLUTranscoder",
    "JumpReLUSkipTranscoder",
    "CrossCoder",
    "TopKCrossCoder",
    "BatchTopKCrossCoder",
    "CrossLayerTranscoder",
    "JumpReLUCrossLayerTranscoder",
    "TopKCrossLayerTranscoder",
    "BatchTopKCrossLayerTranscoder",
    "SAEGroup",
    "ActivationDataModule",
    "StreamingActivationDataModule",
    "ToySuperpositionDataModule",
    "DecoderNormConstraint",
    "DeadFeatureResampler",
    "DataInformedInit",
    "FeatureDensityMonitor",
    "FeatureGeometryMonitor",
    "DownstreamEval",
    "load",
    "export_sae",
    "export_checkpoint",
    "compare_saes",
    "LatentParallelStrategy",
    "consolidate_checkpoint",
]

if TYPE_CHECKING:
    from lightning_sae.callbacks.decoder_norm import DecoderNormConstraint
    from lightning_sae.callbacks.density import FeatureDensityMonitor
    from lightning_sae.callbacks.downstream import DownstreamEval
    from lightning_sae.callbacks.geometry import FeatureGeometryMonitor
    from lightning_sae.callbacks.init import DataInformedInit
    from lightning_sae.callbacks.resampling import DeadFeatureResampler
    from lightning_sae.data.activations import ActivationDataModule
    from lightning_sae.data.stream import StreamingActivationDataModule
    from lightning_sae.data.toy import ToySuperpositionDataModule
    from lightning_sae.io import export_checkpoint, export_sae, load
    from lightning_sae.metrics.similarity import compare_saes
    from lightning_sae.models import (
        ApproxL0SAE,
        BatchTopKSAE,
        GatedSAE,
        JumpReLUSAE,
        MatryoshkaSAE,
        SparseAutoencoder,
        StandardSAE,
        TopKSAE,
    )
    from lightning_sae.models.group import SAEGroup
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
    from lightning_sae.parallel import LatentParallelStrategy, consolidate_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
