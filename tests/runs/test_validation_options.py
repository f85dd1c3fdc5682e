"""/train's validation options (checked before a run exists), and the validation figures in /status."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import RunDir, append_event
from fluxtrain.runs.db import Database
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import create_run, get_run
from fluxtrain.runs.status import build_status
from fluxtrain.settings import Settings
from fluxtrain.training.config import load_config


def _dataset(settings: Settings, name: str, images: int) -> Path:
    folder = settings.datasets_dir / name
    folder.mkdir(parents=True)
    for index in range(images):
        Image.new("RGB", (64, 64), (index * 40, 0, 0)).save(folder / f"{index}.png")
    toml = settings.datasets_dir / f"{name}.toml"
    toml.write_text(
        f'[[datasets]]\nresolution = 64\n\n[[datasets.subsets]]\nimage_dir = "{folder}"\n', encoding="utf-8"
    )
    return toml


def _create(settings: Settings, db: Database, **fields: object) -> Path:
    run = create_run(settings=settings, db=db, request=TrainRequest(output_name="three", **fields))
    return settings.runs_dir / run.id


def _no_run(settings: Settings) -> bool:
    return not settings.runs_dir.exists() or not any(settings.runs_dir.iterdir())


def test_validation_fields_reach_run_json(run_settings: Settings, db: Database) -> None:
    _dataset(run_settings, "three", 3)
    held = _dataset(run_settings, "held", 1)
    config = load_config(_create(run_settings, db, validation_split=0.34, keep_best_only=True) / "run.json")
    assert (config.validation_split, config.keep_best_only, config.validates) == (0.34, True, True)
    run = _create(run_settings, db, validation_dataset="held", validation_every_n_steps=50)
    config = load_config(run / "run.json")
    assert config.validation_dataset_config == held.resolve() and config.validation_every_n_steps == 50


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"validation_split": 3}, "holds out 3 of the dataset's 3 image(s) and leaves none to train on"),
        ({"validation_split": 0.9}, "leaves none to train on"),
        ({"validation_split": 1, "validation_dataset": "held"}, "give one source of held-out images"),
        ({"keep_best_only": True}, "keep_best_only needs validation_split or validation_dataset"),
        ({"validation_every_n_steps": 5}, "validation_every_n_steps needs validation_split"),
        ({"validation_dataset": "empty"}, "validation_dataset 'empty' lists no images"),
        ({"validation_dataset": "three"}, "validation_dataset 'three' holds every image of the training"),
        ({"validation_dataset": "copy"}, "validation_dataset 'copy' holds every image of the training"),
        ({"dataset": "twins", "validation_split": 1}, "every other image is a copy of one of them"),
    ],
)
def test_validation_options_that_cannot_work_are_refused_before_a_run_exists(
    run_settings: Settings, db: Database, fields: dict, needle: str
) -> None:
    _dataset(run_settings, "three", 3)
    _dataset(run_settings, "held", 1)
    _dataset(run_settings, "empty", 0)
    _dataset(run_settings, "copy", 4)  # the same pictures as "three" under the same names, and one more
    twins = _dataset(run_settings, "twins", 1).parent / "twins"
    (twins / "again.png").write_bytes((twins / "0.png").read_bytes())  # two files, one picture
    with pytest.raises(InvalidInputError) as caught:
        _create(run_settings, db, **fields)
    assert needle in str(caught.value)
    assert _no_run(run_settings)


def test_train_answers_404_for_a_missing_validation_dataset_and_422_for_a_split(
    client: TestClient, run_settings: Settings
) -> None:
    _dataset(run_settings, "three", 3)
    missing = client.post("/train", json={"output_name": "three", "validation_dataset": "nope"})
    assert missing.status_code == 404, missing.text
    assert "validation_dataset config 'nope.toml' not found" in missing.text
    for split in (True, 1.5, 0, 3, 1.0, "2.0"):
        answer = client.post("/train", json={"output_name": "three", "validation_split": split})
        assert answer.status_code == 422, (split, answer.text)
    whole = client.post("/train", json={"output_name": "three", "validation_split": 1.0})
    assert "a count of images is a whole number (1, not 1.0)" in whole.text  # not quietly one image
    assert _no_run(run_settings)


def test_openapi_offers_the_validation_fields(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    request = schema["TrainRequest"]["properties"]
    assert {"validation_split", "validation_dataset", "validation_every_n_steps", "keep_best_only"} <= set(
        request
    )
    assert "validation_dataset_config" not in request
    assert "validation_loss" in schema["Progress"]["properties"]
    assert "best_checkpoint" in schema["RunStatusOut"]["properties"]


def test_status_shows_the_latest_trained_validation_loss_and_the_best_checkpoint(
    run_settings: Settings, db: Database
) -> None:
    _dataset(run_settings, "three", 3)
    folder = _create(run_settings, db, validation_split=1)
    run = get_run(db=db, run_id=folder.name)
    events = RunDir(folder).events
    append_event(events, "started", total_steps=900, validation_images=1)
    append_event(events, "validation", step=0, loss=0.9, losses={"0.25": 0.9}, images=1)
    body = build_status(run_settings, run)
    assert body.progress.validation_loss is None and body.best_checkpoint is None  # the base figure alone
    append_event(events, "validation", step=10, loss=0.42, losses={"0.25": 0.42}, images=1)
    for step in range(11, 900):  # more step events than /status reads for its recent events
        append_event(events, "step", step=step, total_steps=900, epoch=1, loss=0.5)
    assert build_status(run_settings, run).progress.validation_loss == 0.42
    append_event(events, "validation", step=900, loss=0.4, losses={"0.25": 0.4}, images=1)
    append_event(
        events, "finished", step=900, best_checkpoint="three-000001.safetensors", best_validation_loss=0.3
    )
    body = build_status(run_settings, run)
    assert (body.progress.validation_loss, body.best_checkpoint) == (0.4, "three-000001.safetensors")
