"""Image captioning: the captioner interface and its Florence-2 implementation."""
