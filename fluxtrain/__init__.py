"""fluxtrain: image URLs in, a trained FLUX.1 LoRA out."""

__version__ = "0.1.0"
