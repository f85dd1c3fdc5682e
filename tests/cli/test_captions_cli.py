"""`fluxtrain caption`: the service call with a progress bar, a failure table and exit codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fluxtrain.cli.main import app
from fluxtrain.settings import Settings, get_settings

runner = CliRunner()
FAST = ["--max-new-tokens", "4", "--num-beams", "1"]


@pytest.fixture(autouse=True)
def settings_from_env(caption_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MOUNT_PATH", str(caption_settings.data_root))
    monkeypatch.setenv("FS_PATH", str(caption_settings.models_root))
    monkeypatch.setenv("FLUXTRAIN_CAPTION_MODEL", caption_settings.caption_model)
    monkeypatch.setenv("FLUXTRAIN_CAPTION_DEVICE", "cpu")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_caption_writes_every_caption(make_dataset) -> None:
    folder = make_dataset(count=2)
    result = runner.invoke(app, ["caption", "cats", "--trigger-word", "mycat", *FAST])
    assert result.exit_code == 0, result.output
    assert "2 captioned, 0 failed" in result.output
    assert (folder / "img0.txt").read_text(encoding="utf-8").startswith("mycat, ")
    assert (folder / "img1.txt").read_text(encoding="utf-8").startswith("mycat, ")


def test_failures_are_listed_and_exit_1(make_dataset) -> None:
    folder = make_dataset(count=1)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    result = runner.invoke(app, ["caption", "cats", "-t", "mycat", *FAST], terminal_width=200)
    assert result.exit_code == 1
    assert "broken.jpg" in result.output
    assert "1 captioned, 1 failed" in result.output


def test_existing_captions_stay_unless_overwrite(make_dataset) -> None:
    folder = make_dataset(count=1)
    (folder / "img0.txt").write_text("mine", encoding="utf-8")
    assert runner.invoke(app, ["caption", "cats", "-t", "mycat", *FAST]).exit_code == 0
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "mine"
    assert runner.invoke(app, ["caption", "cats", "-t", "mycat", "--overwrite", *FAST]).exit_code == 0
    assert (folder / "img0.txt").read_text(encoding="utf-8").startswith("mycat, ")


def test_unknown_dataset_is_a_readable_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["caption", "nope", "-t", "mycat"])
    assert result.exit_code == 1
    assert "dataset 'nope' does not exist" in result.output
    assert "Traceback" not in result.output


def test_unknown_task_is_refused() -> None:
    result = runner.invoke(app, ["caption", "cats", "-t", "mycat", "--task", "<OD>"])
    assert result.exit_code == 2
    assert "--task" in result.output
