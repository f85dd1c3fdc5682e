"""Fixtures shared by every test folder: settings on a temporary data root, an API client, and a
loopback image server with settings allowed to reach it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(mount_path=tmp_path / "data", fs_path=tmp_path / "models", _env_file=None)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    running = LoopbackServer().start()
    yield running
    running.stop()


@pytest.fixture
def open_settings(settings: Settings) -> Settings:
    """Settings that may fetch from loopback, with a short timeout so failures are quick."""
    return settings.model_copy(
        update={"allow_networks": [ipaddress.ip_network("127.0.0.0/8")], "download_timeout": 2.0}
    )
