"""A dataset folder holding one real JPEG, for the dataset-config tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.settings import Settings


@pytest.fixture
def dataset_folder(settings: Settings) -> Path:
    folder = settings.datasets_dir / "cats"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "cat1.jpg", quality=95)
    (folder / "cat1.txt").write_text("mycat, a red square", encoding="utf-8")
    return folder
