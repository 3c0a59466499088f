"""SAE variants, one module each, and the fixed table of them.

:data:`VARIANTS` is the only way a class name read from a file (an export's ``cfg.json``, a
checkpoint's ``_class_path``) becomes a class: looking it up here never imports a module that the
file names, so a downloaded SAE folder cannot run code by naming one.
"""

from __future__ import annotations

from lightning_sae.models.approx_l0 import ApproxL0SAE
from lightning_sae.models.base import SparseAutoencoder
from lightning_sae.models.clt import (
    CROSS_LAYER_TRANSCODERS,
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
    CROSSCODERS,
    TRANSCODERS,
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

__all__ = [
    "VARIANTS",
    "ApproxL0SAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "BatchTopKCrossCoder",
    "BatchTopKCrossLayerTranscoder",
    "CrossLayerTranscoder",
    "JumpReLUCrossLayerTranscoder",
    "TopKCrossLayerTranscoder",
    "BatchTopKSkipTranscoder",
    "BatchTopKTranscoder",
    "CrossCoder",
    "JumpReLUSkipTranscoder",
    "JumpReLUTranscoder",
    "SkipTranscoder",
    "TopKCrossCoder",
    "TopKSkipTranscoder",
    "TopKTranscoder",
    "Transcoder",
    "class_path_of",
    "variant_class",
]

# Full class path -> class, for every SAE class the project ships.
VARIANTS: dict[str, type[SparseAutoencoder]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls
    for cls in (
        SparseAutoencoder,
        StandardSAE,
        TopKSAE,
        BatchTopKSAE,
        MatryoshkaSAE,
        JumpReLUSAE,
        GatedSAE,
        ApproxL0SAE,
        *TRANSCODERS,
        *CROSSCODERS,
        *CROSS_LAYER_TRANSCODERS,
    )
}


def class_path_of(cls: type[SparseAutoencoder]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def variant_class(name: str, source: str = "the class name") -> type[SparseAutoencoder]:
    """The project's SAE class called ``name``: its full class path, a path it is re-exported
    under (``lightning_sae.TopKSAE``, as jsonargparse records short names), or the short name.

    ``source`` says where the name was read, for the error message.
    """
    for cls in VARIANTS.values():
        short = cls.__name__
        if name in (class_path_of(cls), f"lightning_sae.models.{short}", f"lightning_sae.{short}"):
            return cls
        if name == short:
            return cls
    raise ValueError(
        f"{source} names {name!r}, which is not one of lightning-sae's SAE classes; it is never "
        "imported. Use one of: " + ", ".join(cls.__name__ for cls in VARIANTS.values()) + "."
    )
