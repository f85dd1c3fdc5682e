"""The CLI tests use the fixtures of the layers their commands call."""

from __future__ import annotations

from tests.captioning.conftest import caption_settings, fresh_model_cache, make_dataset, tiny_florence2
from tests.dataset_config.conftest import dataset_folder
from tests.datasets.conftest import png_bytes

__all__ = [
    "caption_settings",
    "dataset_folder",
    "fresh_model_cache",
    "make_dataset",
    "png_bytes",
    "tiny_florence2",
]
