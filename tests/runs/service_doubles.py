"""Set-up shared by tests that run the whole service with a trainer double in place of the trainer.

Imported as `from tests.runs.service_doubles import use_trainer_double` (pytest's importlib mode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.runs import executor as executor_module
from fluxtrain.runs.local_backend import LocalBackend
from fluxtrain.settings import Settings
from fluxtrain.training.tiny import write_tiny_flux_files


def use_trainer_double(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, *, script: Path, source: str
) -> None:
    """Make the service's executor launch `source` as its trainer, with a `demo` dataset TOML and
    real tiny model files in place, so /train's checks pass as they would in production."""
    script.write_text(source)
    backend = LocalBackend(gpus="", entry=(str(script),))
    monkeypatch.setattr(executor_module, "make_backend", lambda _: backend)
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    write_trainable_dataset(settings, "demo")
    settings.models_root.mkdir(parents=True, exist_ok=True)
    write_tiny_flux_files(settings.models_root)


def write_trainable_dataset(settings: Settings, name: str) -> Path:
    """Dataset `name` with one captioned 256 px picture and its TOML: /train's lint finds no error."""
    folder = settings.datasets_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.random.default_rng(len(name)).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(grid).resize((256, 256), Image.Resampling.BICUBIC).save(folder / "picture.jpg")
    (folder / "picture.txt").write_text("zqx, a smooth field of colour", encoding="utf-8")
    request = DatasetConfig(output_name=name, trigger_word="zqx", resolution=256, num_repeats=1)
    return create_dataset_config(settings=settings, request=request)
