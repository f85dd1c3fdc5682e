"""Fixtures for dataset tests: a loopback image server, settings that may reach it."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from fluxtrain.settings import Settings


def _load_support() -> ModuleType:
    """tests/datasets/support.py as the importable module `dataset_support`."""
    if "dataset_support" not in sys.modules:
        path = Path(__file__).with_name("support.py")
        spec = importlib.util.spec_from_file_location("dataset_support", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["dataset_support"] = module
        spec.loader.exec_module(module)
    return sys.modules["dataset_support"]


support = _load_support()


@pytest.fixture
def server() -> Iterator[support.LoopbackServer]:
    running = support.LoopbackServer().start()
    yield running
    running.stop()


@pytest.fixture
def open_settings(settings: Settings) -> Settings:
    """Settings that may fetch from loopback, with a short timeout so failures are quick."""
    return settings.model_copy(
        update={"allow_networks": [ipaddress.ip_network("127.0.0.0/8")], "download_timeout": 2.0}
    )


@pytest.fixture
def png_bytes() -> bytes:
    return support.encode(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")
