"""FLUX.2 edit pairs before a run exists: /train takes a klein run on a dataset with up to four
references per target and a [dev] run with up to ten, refuses more (naming the files), and dataset
lint, which knows no family yet, warns that only FLUX.2 trains several references."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.datasets.lint_service import lint_run_dataset
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import resolve_config
from fluxtrain.settings import Settings
from tests.training.helpers_flux2 import run_files

KLEIN = run_files("flux2-klein-4b")
DEV = run_files("flux2-dev")


@pytest.fixture
def klein_settings(settings: Settings, tiny_flux2_models: Path) -> Settings:
    shutil.copytree(tiny_flux2_models, settings.models_root)
    return settings


@pytest.fixture
def dev_settings(settings: Settings, dev_models: Path) -> Settings:
    shutil.copytree(dev_models, settings.models_root)
    return settings


def _pairs(settings: Settings, references: dict[str, int]) -> None:
    """Targets `a.jpg`, `b.jpg` with the given number of controls each (`a_0.jpg`, `a_1.jpg`, ...)."""
    folder = settings.datasets_dir / "pairs"
    (folder / "control").mkdir(parents=True)
    for stem, count in references.items():
        Image.new("RGB", (64, 64), (120, 40, 200)).save(folder / f"{stem}.jpg")
        for index in range(count):
            Image.new("RGB", (64, 64), (20, 140, index * 40)).save(folder / "control" / f"{stem}_{index}.jpg")
    create_dataset_config(settings=settings, request=DatasetConfig(output_name="pairs", trigger_word="zqx"))


def _reference_findings(
    settings: Settings, files: dict[str, str] = KLEIN, family: str = "flux2-klein-4b"
) -> list[tuple[str, str, list[str]]]:
    config = resolve_config(settings=settings, request=TrainRequest(output_name="pairs", **files))
    assert config.model_family == family
    report = lint_run_dataset(settings=settings, config=config)
    return [(f.severity, f.message, f.files) for f in report.findings if f.kind == "too_many_references"]


def test_a_klein_run_takes_two_and_four_references(klein_settings: Settings) -> None:
    _pairs(klein_settings, {"a": 2, "b": 4})
    assert _reference_findings(klein_settings) == []


def test_more_than_four_references_for_klein_are_an_error_naming_the_files(klein_settings: Settings) -> None:
    _pairs(klein_settings, {"a": 2, "b": 5})
    [(severity, message, files)] = _reference_findings(klein_settings)
    assert severity == "error" and files == ["b.jpg"]
    assert "more than 4 control image(s), the most FLUX.2 [klein] 4B takes: b.jpg" in message


def test_a_dev_run_takes_up_to_ten_references_and_refuses_more(dev_settings: Settings) -> None:
    _pairs(dev_settings, {"a": 10, "b": 11})
    [(severity, message, files)] = _reference_findings(dev_settings, DEV, "flux2-dev")
    assert severity == "error" and files == ["b.jpg"]
    assert "more than 10 control image(s), the most FLUX.2 [dev] takes: b.jpg" in message


def test_train_answers_422_for_too_many_references(klein_settings: Settings, client: TestClient) -> None:
    _pairs(klein_settings, {"a": 1, "b": 5})
    response = client.post("/train", json={"output_name": "pairs", **KLEIN})
    assert response.status_code == 422, response.text
    assert "too_many_references" in response.text and "b.jpg" in response.text


def test_dataset_lint_warns_that_only_flux2_takes_several_references(
    settings: Settings, client: TestClient
) -> None:
    _pairs(settings, {"a": 1, "b": 3})
    findings = [f for f in client.post("/datasets/pairs/lint").json()["findings"] if "refer" in f["kind"]]
    [finding] = findings
    assert finding["severity"] == "warning" and finding["files"] == ["b.jpg"]
    assert "more than 1 control image(s), the most FLUX.1 Kontext takes" in finding["message"]
    assert "only FLUX.2 [klein] 4B, FLUX.2 [klein] 9B, FLUX.2 [dev] train" in finding["message"]


def test_dataset_lint_warns_that_only_dev_takes_more_than_four(
    settings: Settings, client: TestClient
) -> None:
    _pairs(settings, {"a": 1, "b": 6})
    findings = [f for f in client.post("/datasets/pairs/lint").json()["findings"] if "refer" in f["kind"]]
    assert {f["severity"] for f in findings} == {"warning"} and all(f["files"] == ["b.jpg"] for f in findings)
    [kontext, klein] = [f["message"] for f in findings]
    assert "more than 1 control image(s), the most FLUX.1 Kontext takes;" in kontext
    assert "more than 4 control image(s), the most FLUX.2 [klein] 4B, FLUX.2 [klein] 9B take;" in klein
    assert all("only FLUX.2 [dev] train(s) them: b.jpg" in message for message in (kontext, klein))


def test_dataset_lint_refuses_more_references_than_any_family_takes(
    settings: Settings, client: TestClient
) -> None:
    _pairs(settings, {"a": 1, "b": 11})
    [finding] = [f for f in client.post("/datasets/pairs/lint").json()["findings"] if "refer" in f["kind"]]
    assert finding["severity"] == "error" and finding["files"] == ["b.jpg"]
    assert "more than 10 control image(s), the most any family takes (FLUX.2 [dev])" in finding["message"]
