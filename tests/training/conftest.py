"""Shared fixtures for training tests: the tiny FLUX.1 model files, written once per session."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from accelerate.state import AcceleratorState, GradientState

from fluxtrain.training.tiny import write_tiny_flux_files
from fluxtrain.training.tiny_flux2 import write_tiny_flux2_files
from fluxtrain.training.tiny_flux2_dev import write_tiny_flux2_dev_files
from tests.training.helpers_flux2 import write_pretrained_flux2

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root with flux1-dev.sft, ae.sft, clip_l.safetensors, t5xxl_fp16.safetensors, tokenizers/."""
    root = tmp_path_factory.mktemp("tiny_models")
    write_tiny_flux_files(root)
    return root


@pytest.fixture(scope="session")
def tiny_schnell_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_models, but the transformer has no guidance embedding (FLUX.1-schnell layout)."""
    root = tmp_path_factory.mktemp("tiny_schnell_models")
    write_tiny_flux_files(root, guidance=False)
    return root


@pytest.fixture(scope="session")
def tiny_flux2_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root with the tiny FLUX.2 [klein] files of `write_tiny_flux2_files` and tokenizers/qwen3."""
    root = tmp_path_factory.mktemp("tiny_flux2_models")
    write_tiny_flux2_files(root)
    return root


@pytest.fixture(scope="session")
def klein_base(tiny_flux2_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny klein files with a briefly pretrained transformer (see helpers_flux2), for LoRA runs
    that must learn: plain klein and its edit pairs share it."""
    return write_pretrained_flux2(tiny_flux2_models, tmp_path_factory.mktemp("klein_base"))


@pytest.fixture(scope="session")
def dev_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root with the tiny FLUX.2 [dev] files of `write_tiny_flux2_dev_files`."""
    root = tmp_path_factory.mktemp("tiny_flux2_dev_models")
    write_tiny_flux2_dev_files(root)
    return root


@pytest.fixture(scope="session")
def dev_base(dev_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny [dev] files with a briefly pretrained transformer (see helpers_flux2)."""
    return write_pretrained_flux2(dev_models, tmp_path_factory.mktemp("dev_base"), family_name="flux2-dev")


@pytest.fixture(scope="session")
def bench() -> ModuleType:
    """bench/train_step.py as a module: its FLOP count and its input builder."""
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training tests never reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Each in-process Trainer gets its own accelerate state (it is a process-wide singleton that
    refuses a second mixed precision), as each trainer process does."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
