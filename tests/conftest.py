"""Fixtures shared by every test folder: settings on a temporary data root, and an API client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(mount_path=tmp_path / "data", fs_path=tmp_path / "models", _env_file=None)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client
