"""What the features of a trained SAE respond to: per-feature top contexts, activation
histograms, logit effects and neighbours (:func:`inspect`), saved as data
(:func:`load_inspection`) and as a static HTML browser."""

from lightning_sae.analysis.inspector import InspectError, inspect
from lightning_sae.analysis.results import Inspection, load_inspection

__all__ = ["InspectError", "Inspection", "inspect", "load_inspection"]
