import logging
import re

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings


def test_health_is_open(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "api_key": "none"}


def test_openapi_and_docs_stay_open_with_a_key(settings: Settings) -> None:
    settings.api_key = SecretStr("s3cret")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json() == {"status": "ok", "api_key": "required"}
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200


def test_settings_read_seed_and_new_names(monkeypatch) -> None:
    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("MOUNT_PATH", "/tmp/ft-data")
    monkeypatch.setenv("FLUXTRAIN_ALLOW_NETWORKS", "127.0.0.0/8, 10.0.0.0/8")
    monkeypatch.setenv("FLUXTRAIN_MAX_URLS", "7")
    settings = Settings(_env_file=None)
    assert settings.port == 9123
    assert str(settings.data_root) == "/tmp/ft-data"
    assert str(settings.models_root) == "/tmp/ft-data/models"
    assert [str(n) for n in settings.allow_networks] == ["127.0.0.0/8", "10.0.0.0/8"]
    assert settings.max_urls == 7


def test_lone_surrogate_in_a_body_is_a_422_not_a_500(client: TestClient) -> None:
    body = b'{"output_name": "ok", "trigger_word": "\\ud800"}'
    response = client.post(
        "/create-dataset-config", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"]


OPEN_PATHS = {"/health"}
KEY = "k3y-that-must-never-be-logged"


def _protected_routes() -> list[tuple[str, str]]:
    paths = create_app(Settings(_env_file=None)).openapi()["paths"]
    routes = sorted(
        (method.upper(), path) for path, ops in paths.items() if path not in OPEN_PATHS for method in ops
    )
    assert len(routes) >= 15, routes
    return routes


@pytest.mark.parametrize(("method", "path"), _protected_routes())
def test_every_other_route_needs_the_key(
    settings: Settings, method: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings.api_key = SecretStr(KEY)
    url = re.sub(r"\{[^}]+\}", "x", path)
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings)) as client:
        missing = client.request(method, url)
        wrong = client.request(method, url, headers={"Authorization": "Bearer nope"})
        right = client.request(method, url, headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert right.status_code != 401
    assert KEY not in caplog.text


def test_redoc_is_not_served(client: TestClient) -> None:
    assert client.get("/redoc").status_code == 404
