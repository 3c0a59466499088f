"""lightning-sae: sparse autoencoders on transformer activations, trained with PyTorch Lightning."""

__version__ = "0.1.0"
