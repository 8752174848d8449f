"""mmn: multimodal neurons in pretrained text-only transformers (Schwettmann et al.)."""

__version__ = "0.1.0"
