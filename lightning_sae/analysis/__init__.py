"""What the features of a trained SAE respond to: per-feature top contexts, activation
histograms, logit effects and neighbours (:func:`inspect`), saved as data
(:func:`load_inspection`) and as a static HTML browser; and how a cross-layer transcoder's
features compute a prompt's logits (:func:`attribute`, attribution graphs)."""

from lightning_sae.analysis.attribution import (
    AttributionError,
    AttributionGraph,
    LocalReplacementModel,
    attribute,
)
from lightning_sae.analysis.inspector import InspectError, inspect
from lightning_sae.analysis.results import Inspection, load_inspection

__all__ = [
    "AttributionError",
    "AttributionGraph",
    "InspectError",
    "Inspection",
    "LocalReplacementModel",
    "attribute",
    "inspect",
    "load_inspection",
]
