"""The compose files follow the Compose specification and name only settings the service reads."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from fluxtrain.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.dev.yml"]
# Variables that are compose's own (or the postgres image's), not fluxtrain settings.
COMPOSE_ONLY = {"COMPOSE_PROFILES", "POSTGRES_PASSWORD"}
# Variables the image sets for Python itself rather than for fluxtrain.
RUNTIME_ONLY = {
    "PYTHONPATH", "DEBIAN_FRONTEND", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK", "PATH", "HF_HOME"
}  # fmt: skip


def setting_names() -> set[str]:
    """The environment names `Settings` reads: the seed's bare names, FLUXTRAIN_* for the rest."""
    names = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        names.add(alias.choices[0] if alias is not None else f"FLUXTRAIN_{field.upper()}")
    return names


def compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def interpolated(name: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Z0-9_]+)", (REPO / name).read_text()))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_follows_the_specification(name: str) -> None:
    schema = compose_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(load(name))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_names_only_settings(name: str) -> None:
    service = load(name)["services"]["fluxtrain"]
    named = set(service["environment"]) | interpolated(name)
    unknown = named - setting_names() - COMPOSE_ONLY - RUNTIME_ONLY
    assert not unknown, f"{name} names what Settings does not read: {sorted(unknown)}"
    assert service["environment"]["MOUNT_PATH"] == "/data" and service["environment"]["FS_PATH"] == "/models"
    targets = {volume.rsplit(":", 1)[-1] for volume in service["volumes"] if not volume.endswith(":ro")}
    assert {"/data", "/models"} <= targets
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert service["env_file"] == [{"path": ".env", "required": False}]


def test_postgres_profile_is_optional_and_matches_the_example_url() -> None:
    compose = load("docker-compose.yml")
    postgres = compose["services"]["postgres"]
    assert postgres["profiles"] == ["postgres"]
    assert compose["services"]["fluxtrain"]["depends_on"]["postgres"]["required"] is False
    example = (REPO / ".env.example").read_text()
    url = re.search(r"^# FLUXTRAIN_DATABASE_URL=(\S+)", example, re.M).group(1)
    env = postgres["environment"]
    assert url.startswith("postgresql+psycopg://")
    assert url.endswith(f"{env['POSTGRES_USER']}:fluxtrain@postgres:5432/{env['POSTGRES_DB']}")


def test_env_example_lists_every_readme_setting_and_nothing_else() -> None:
    readme = (REPO / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.M))
    example = set(re.findall(r"^# ([A-Z][A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.M))
    assert table - example == set(), "settings in the README missing from .env.example"
    assert example - setting_names() - COMPOSE_ONLY == set(), ".env.example names what Settings does not read"


def test_dockerfile_sets_only_settings_and_serves_their_defaults() -> None:
    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env = dict(re.findall(r"([A-Z][A-Z0-9_]+)=(\S+)", " ".join(re.findall(r"^ENV (.*)$", dockerfile, re.M))))
    assert set(env) - setting_names() - RUNTIME_ONLY == set()
    default_port = str(Settings.model_fields["port"].default)
    assert re.search(r"^EXPOSE (\d+)$", dockerfile, re.M).group(1) == env["PORT"] == default_port
    assert re.search(r"^HEALTHCHECK .*/health", dockerfile, re.M)
    assert re.search(r'^CMD \["fluxtrain", "serve"\]$', dockerfile, re.M)
    assert re.search(r"^USER (\S+)$", dockerfile, re.M).group(1) != "root"
