"""`fluxtrain config`: the same library call as the API, with readable errors and exit codes."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fluxtrain.cli.main import app
from fluxtrain.settings import Settings, get_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def data_root_from_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MOUNT_PATH", str(settings.data_root))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_config_writes_the_toml(settings: Settings, dataset_folder: Path) -> None:
    result = runner.invoke(
        app,
        [
            "config",
            "cats",
            "--trigger-word",
            "mycat",
            "--num-repeats",
            "4",
            "--resolution",
            "768",
            "--no-bucket",
            "--shuffle-caption",
            "--flip-aug",
        ],
    )
    assert result.exit_code == 0, result.output
    path = settings.datasets_dir / "cats.toml"
    assert result.stdout.strip() == str(path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["general"]["shuffle_caption"] is True
    assert data["general"]["flip_aug"] is True
    assert data["general"]["color_aug"] is False
    assert data["datasets"][0]["resolution"] == 768
    assert data["datasets"][0]["enable_bucket"] is False
    assert data["datasets"][0]["subsets"][0]["num_repeats"] == 4
    assert data["datasets"][0]["subsets"][0]["class_tokens"] == "mycat"


def test_config_refuses_bad_resolution(settings: Settings, dataset_folder: Path) -> None:
    result = runner.invoke(app, ["config", "cats", "-t", "mycat", "--resolution", "1000"])
    assert result.exit_code == 2
    assert "multiple of 64" in result.output
    assert not (settings.datasets_dir / "cats.toml").exists()


def test_config_reports_a_missing_dataset(settings: Settings) -> None:
    result = runner.invoke(app, ["config", "dogs", "-t", "dog"])
    assert result.exit_code == 1
    assert "dataset 'dogs' does not exist" in result.output


def test_config_help_names_the_options() -> None:
    result = runner.invoke(app, ["config", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--trigger-word", "--num-repeats", "--resolution", "--batch-size", "--no-bucket"):
        assert option in result.output
