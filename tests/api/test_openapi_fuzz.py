"""Property-based run of schemathesis against the app's own /openapi.json: no input may cause a 5xx.

Every operation the app has when the test runs is covered. Data lives under a temporary root, no
network is allowed to URL fetching, and host-name look-ups fail at once, so nothing leaves
the machine.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings


def _no_dns(*_args: Any, **_kwargs: Any) -> list[Any]:
    raise socket.gaierror(socket.EAI_NONAME, "name resolution is disabled in this test")


APP = create_app(Settings(mount_path=Path(tempfile.gettempdir()) / "fluxtrain-fuzz-unused", _env_file=None))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(autouse=True)
def isolated(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point the app at this test's temporary data root and make host-name look-ups fail."""
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    unused = APP.state.settings
    APP.state.settings = settings.model_copy(update={"download_timeout": 1.0, "max_urls": 20})
    yield
    APP.state.settings = unused


@schema.parametrize()
@hypothesis_settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_input_causes_a_server_error(case: Any) -> None:
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
