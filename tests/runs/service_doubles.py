"""Set-up shared by tests that run the whole service with a trainer double in place of the trainer.

Imported as `from tests.runs.service_doubles import use_trainer_double` (pytest's importlib mode).
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
    (settings.datasets_dir / "demo.toml").write_text("[general]\n")
    settings.models_root.mkdir(parents=True, exist_ok=True)
    write_tiny_flux_files(settings.models_root)
