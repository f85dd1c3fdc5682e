"""The CLI's side of validation: `fluxtrain train` options and what `fluxtrain status` prints."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fluxtrain.cli.main import app
from fluxtrain.cli.runs import _print_status

runner = CliRunner()


def test_train_has_an_option_for_each_validation_field() -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.output)
    for option in ("--validation-split", "--validation-dataset", "--validation-every-n-steps"):
        assert option in text
    assert "--keep-best-only" in text and "--no-keep-best-only" in text
    assert "--validation-dataset-config" not in text


def test_status_prints_the_validation_loss_and_the_best_checkpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = {"step": 6, "total_steps": 6, "epoch": 6, "total_epochs": 6, "loss": 0.5}
    progress |= {"it_per_s": 2.0, "eta_seconds": 0, "validation_loss": 0.123456}
    body = {"run_id": "r1", "status": "succeeded", "progress": progress, "outputs": [], "logs": []}
    body |= {"error": None, "best_checkpoint": "tiny-000002.safetensors"}
    _print_status(body)
    out = capsys.readouterr().out
    assert "validation loss 0.12346" in out and "best checkpoint tiny-000002.safetensors" in out
    progress["validation_loss"] = None
    _print_status({**body, "best_checkpoint": None})
    out = capsys.readouterr().out
    assert "validation" not in out and "best checkpoint" not in out
