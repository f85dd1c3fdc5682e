"""`POST /datasets/{name}/lint`, and lint at `/train`: errors refuse the run, warnings stay with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fluxtrain.api.app import create_app
from fluxtrain.cli import runs as runs_cli
from fluxtrain.rundir import RunDir
from fluxtrain.settings import Settings
from tests.datasets.pictures import add_image, picture
from tests.runs.service_doubles import use_trainer_double, write_trainable_dataset

TRAINER = "import sys, time\ntime.sleep(0.2)\nsys.exit(0)\n"


@pytest.fixture
def api(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    use_trainer_double(settings, monkeypatch, script=tmp_path / "trainer_double.py", source=TRAINER)
    with TestClient(create_app(settings)) as client:
        yield client


def test_lint_answers_the_report_with_or_without_a_body(api: TestClient, settings: Settings) -> None:
    folder = settings.datasets_dir / "pets"
    add_image(folder, "a.jpg", picture(1, (512, 512)), "a dog")
    add_image(folder, "b.jpg", picture(2, (512, 512)))

    response = api.post("/datasets/pets/lint", json={"trigger_word": "zqx", "resolution": 512})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["dataset"], body["images"], body["errors"], body["token_limit"]) == ("pets", 2, 0, 512)
    kinds = {finding["kind"]: finding["files"] for finding in body["findings"]}
    assert kinds["trigger_word_missing"] == ["a.jpg"] and kinds["caption_missing"] == ["b.jpg"]
    assert {finding["severity"] for finding in body["findings"]} == {"warning"}

    bare = api.post("/datasets/pets/lint")
    assert bare.status_code == 200 and "upscaled" in {f["kind"] for f in bare.json()["findings"]}


def test_lint_of_an_unknown_dataset_or_a_bad_value(api: TestClient, settings: Settings) -> None:
    missing = api.post("/datasets/nope/lint")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    (settings.datasets_dir / "pets").mkdir(parents=True)
    assert api.post("/datasets/pets/lint", json={"resolution": 100}).status_code == 422
    assert api.post("/datasets/pets/lint", json={"colour": "red"}).status_code == 422
    escape = api.post("/datasets/pets/lint", json={"pretrained_model": "../flux1-dev.sft"})
    assert escape.status_code == 422 and "leaves the models folder" in escape.json()["detail"]


def test_train_refuses_an_untrainable_dataset_before_any_run(api: TestClient, settings: Settings) -> None:
    write_trainable_dataset(settings, "broken")
    (settings.datasets_dir / "broken" / "picture.jpg").write_bytes(b"truncated download")
    response = api.post("/train", json={"output_name": "out", "dataset": "broken"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "dataset broken cannot be trained" in detail and "unreadable_image" in detail
    assert "picture.jpg" in detail
    assert not settings.runs_dir.exists() or not any(settings.runs_dir.iterdir())

    (settings.datasets_dir / "hollow.toml").write_text("[general]\n", encoding="utf-8")
    hollow = api.post("/train", json={"output_name": "out", "dataset": "hollow"})
    assert hollow.status_code == 422 and "[[datasets]]" in hollow.json()["detail"]


def test_warnings_are_kept_with_the_run_and_shown_by_status(
    api: TestClient, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    response = api.post("/train", json={"output_name": "demo", "max_train_steps": 2000})
    assert response.status_code == 200, response.text
    run_id = response.json()["run_id"]
    kept = json.loads(RunDir(settings.runs_dir / run_id).lint_warnings.read_text())
    assert [w["kind"] for w in kept] == ["too_few_images", "too_many_steps"]

    status = api.get(f"/status/{run_id}").json()
    assert status["warnings"] == kept
    runs_cli._print_status(status)
    shown = capsys.readouterr().out
    assert "warning too_few_images: 1 image(s)" in shown and "warning too_many_steps" in shown
