"""/train's edit pairs: Kontext chosen for a dataset with controls, each pair problem a lint finding."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.datasets.lint_service import lint_run_dataset
from fluxtrain.errors import InvalidInputError
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import resolve_config
from fluxtrain.settings import Settings


def _image(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 40, 200)).save(path)


def _pairs(settings: Settings, controls: dict[str, tuple[int, int]]) -> None:
    folder = settings.datasets_dir / "pairs"
    for stem in ("a", "b"):
        _image(folder / f"{stem}.jpg")
    for name, size in controls.items():
        _image(folder / "control" / name, size)
    create_dataset_config(settings=settings, request=DatasetConfig(output_name="pairs", trigger_word="zqx"))


def _pair_findings(settings: Settings) -> dict[str, tuple[str, str]]:
    config = resolve_config(settings=settings, request=TrainRequest(output_name="pairs"))
    assert config.model_family == "flux1-kontext"
    report = lint_run_dataset(settings=settings, config=config)
    return {
        f.kind: (f.severity, f.message) for f in report.findings if "control" in f.kind or "refer" in f.kind
    }


def test_a_dataset_with_controls_trains_as_kontext_and_warns_of_an_unpaired_control(
    run_settings: Settings,
) -> None:
    _pairs(run_settings, {"a.jpg": (64, 64), "b_0.png": (64, 60), "stray.jpg": (64, 64)})
    findings = _pair_findings(run_settings)
    assert set(findings) == {"control_unpaired"}
    severity, message = findings["control_unpaired"]
    assert severity == "warning" and "match no target stem and are not trained on: stray.jpg" in message


@pytest.mark.parametrize(
    ("controls", "kind", "needle"),
    [
        ({"a.jpg": (64, 64)}, "control_missing", "1 target(s) have no control image in"),
        ({"a.jpg": (64, 64), "b.jpg": (64, 64), "b_1.jpg": (64, 64)}, "too_many_references", "more than 1"),
        (
            {"a.jpg": (64, 64), "b.jpg": (128, 48)},
            "control_aspect",
            "disagree in aspect ratio beyond the bucket",
        ),
    ],
)
def test_pair_problems_are_lint_errors_naming_the_files(
    run_settings: Settings, controls: dict, kind: str, needle: str
) -> None:
    _pairs(run_settings, controls)
    severity, message = _pair_findings(run_settings)[kind]
    assert severity == "error" and needle in message and "b.jpg" in message


def test_pairs_for_a_family_without_them_are_a_422(run_settings: Settings) -> None:
    _pairs(run_settings, {"a.jpg": (64, 64), "b.jpg": (64, 64)})
    with pytest.raises(InvalidInputError, match="has control images .* trains no edit pairs"):
        resolve_config(settings=run_settings, request=TrainRequest(output_name="pairs", model_family="flux1"))


def test_train_answers_422_naming_the_pair_error(run_settings: Settings, client: TestClient) -> None:
    _pairs(run_settings, {"a.jpg": (64, 64)})
    response = client.post("/train", json={"output_name": "pairs"})
    assert response.status_code == 422
    assert "control_missing" in response.text and "b.jpg" in response.text
