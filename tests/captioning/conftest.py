"""The tiny Florence-2 (built once per session), settings that use it, and dataset folders of real images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxtrain.captioning import florence as caption_model
from fluxtrain.captioning.tiny import write_tiny_florence2
from fluxtrain.settings import Settings

MakeDataset = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_florence2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return write_tiny_florence2(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def caption_settings(settings: Settings, tiny_florence2: Path) -> Settings:
    settings.caption_model = str(tiny_florence2)
    settings.caption_device = "cpu"
    return settings


@pytest.fixture(autouse=True)
def fresh_model_cache() -> Iterator[None]:
    caption_model.release_caption_models()
    yield
    caption_model.release_caption_models()


@pytest.fixture
def load_count(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Folders the model was loaded from, one entry per real load."""
    loads: list[Path] = []
    real_load = caption_model._load

    def counting_load(folder: Path, device: torch.device) -> caption_model.CaptionModel:
        loads.append(folder)
        return real_load(folder, device)

    monkeypatch.setattr(caption_model, "_load", counting_load)
    return loads


@pytest.fixture
def make_dataset(settings: Settings) -> MakeDataset:
    def make(name: str = "cats", count: int = 3) -> Path:
        folder = settings.datasets_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            colour = (40 * index % 256, 200 - 30 * index % 200, 90)
            Image.new("RGB", (48 + 8 * index, 40), colour).save(folder / f"img{index}.jpg", quality=90)
        return folder

    return make
