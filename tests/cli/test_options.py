"""Every command takes the API's request models as its options and exits 2 on bad input, 1 on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fluxtrain.captioning.request import CaptionRequest
from fluxtrain.cli.main import app
from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.settings import Settings, get_settings

runner = CliRunner()
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def data_root_from_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MOUNT_PATH", str(settings.data_root))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _params(command: str) -> list:
    return typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("command", "model"), [("train", TrainRequest), ("config", DatasetConfig), ("caption", CaptionRequest)]
)
def test_every_request_field_is_an_option(command: str, model: type) -> None:
    names = {param.name for param in _params(command)}
    assert set(model.model_fields) - {"output_name"} <= names
    options = {option for param in _params("train") for option in param.opts}
    assert {"--epochs", "--steps", "--lr"} <= options


def test_defaults_shown_are_the_models(settings: Settings) -> None:
    result = runner.invoke(app, ["config", "--help"], env={"COLUMNS": "200"})
    assert f"[default: {DatasetConfig.model_fields['num_repeats'].default}]" in result.output


@pytest.mark.parametrize(
    "command", ["download", "datasets", "config", "caption", "train", "status", "runs", "cancel", "logs"]
)
def test_help_documents_the_exit_status(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "2 on bad input, 1 when the operation failed" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["config", "cats", "-t", "tab\tword"],
        ["caption", "cats", "-t", "tab\tword"],
        ["train", "demo", "--lr", "-1", "--url", NOWHERE],
        ["train", "demo", "--set", "no_such_field=1", "--url", NOWHERE],
        ["train", "../demo", "--url", NOWHERE],
    ],
)
def test_bad_input_exits_2_before_anything_is_done(
    args: list[str], settings: Settings, dataset_folder: Path
) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "invalid" in result.output and "cannot reach" not in result.output
    assert not (settings.datasets_dir / "cats.toml").exists()


def test_a_tab_in_the_trigger_word_names_the_option(dataset_folder: Path) -> None:
    result = runner.invoke(app, ["config", "cats", "-t", "tab\tword"])
    assert "invalid --trigger-word" in result.output and "control characters" in result.output


def test_an_unreachable_service_is_a_failed_operation() -> None:
    result = runner.invoke(app, ["train", "demo", "--steps", "2", "--url", NOWHERE])
    assert result.exit_code == 1
    assert "cannot reach the service" in result.output
