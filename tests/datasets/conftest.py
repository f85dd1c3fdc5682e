"""Fixtures for dataset tests; the loopback server and `open_settings` live in tests/conftest.py."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.datasets import support


@pytest.fixture
def png_bytes() -> bytes:
    return support.encode(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")
