"""`fluxtrain lint NAME`: a table of findings; exit 0 with warnings only, 1 with errors, 2 on bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fluxtrain.cli import options as cli_options
from fluxtrain.cli.main import app
from fluxtrain.settings import Settings
from fluxtrain.training.tiny import write_tiny_tokenizers
from tests.datasets.pictures import add_image, picture


@pytest.fixture
def cli_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(cli_options, "get_settings", lambda: settings)
    monkeypatch.setenv("COLUMNS", "200")
    write_tiny_tokenizers(settings.models_root)
    folder = settings.datasets_dir / "pets"
    add_image(folder, "a.jpg", picture(1, (512, 512)), "zqx, a dog")
    add_image(folder, "b.jpg", picture(2, (512, 512)), "a cat")
    return settings


def test_warnings_only_print_a_table_and_exit_0(cli_settings: Settings) -> None:
    result = CliRunner().invoke(
        app, ["lint", "pets", "-t", "zqx", "--resolution", "512", "--max-train-steps", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "trigger_word_missing" in result.output and "b.jpg" in result.output
    assert "2 image(s): 0 error(s), 2 warning(s)" in result.output and "too_few_images" in result.output


def test_errors_exit_1_and_json_is_the_api_report(cli_settings: Settings) -> None:
    (cli_settings.datasets_dir / "pets" / "c.jpg").write_bytes(b"<html>not found</html>")
    result = CliRunner().invoke(app, ["lint", "pets", "--json", "--max-train-steps", "50"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["errors"] == 1 and report["findings"][0]["files"] == ["c.jpg"]


def test_a_missing_dataset_exits_1_and_a_bad_option_2(cli_settings: Settings) -> None:
    missing = CliRunner().invoke(app, ["lint", "nope"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    bad = CliRunner().invoke(app, ["lint", "pets", "--resolution", "100"])
    assert bad.exit_code == 2 and "--resolution" in bad.output
