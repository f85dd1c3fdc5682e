"""/train's edit-pair lint: Kontext chosen for a dataset with controls, and each pair problem a clear 422."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.errors import InvalidInputError
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.runs.service import resolve_config
from fluxtrain.settings import Settings


def _image(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 40, 200)).save(path)


def _pairs(
    settings: Settings, controls: dict[str, tuple[int, int]], targets: tuple[str, ...] = ("a", "b")
) -> None:
    folder = settings.datasets_dir / "pairs"
    for stem in targets:
        _image(folder / f"{stem}.jpg")
    for name, size in controls.items():
        _image(folder / "control" / name, size)
    create_dataset_config(settings=settings, request=DatasetConfig(output_name="pairs", trigger_word="zqx"))


def test_a_dataset_with_controls_trains_as_kontext_and_warns_of_an_unpaired_control(
    run_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    _pairs(run_settings, {"a.jpg": (64, 64), "b_0.png": (64, 60), "stray.jpg": (64, 64)})
    with caplog.at_level(logging.WARNING):
        config = resolve_config(settings=run_settings, request=TrainRequest(output_name="pairs"))
    assert config.model_family == "flux1-kontext"
    assert "match no target stem and are not trained on: stray.jpg" in caplog.text


@pytest.mark.parametrize(
    ("controls", "family", "needle"),
    [
        ({"a.jpg": (64, 64)}, None, "1 target(s) have no control image in"),
        ({"a.jpg": (64, 64), "b.jpg": (64, 64), "b_1.jpg": (64, 64)}, None, "more than 1 control image(s)"),
        (
            {"a.jpg": (64, 64), "b.jpg": (128, 48)},
            None,
            "disagree in aspect ratio beyond the bucket tolerance",
        ),
        ({"a.jpg": (64, 64), "b.jpg": (64, 64)}, "flux1", "trains no edit pairs"),
    ],
)
def test_pair_problems_are_422s_naming_the_files(
    run_settings: Settings, controls: dict, family: str | None, needle: str
) -> None:
    _pairs(run_settings, controls)
    with pytest.raises(InvalidInputError) as raised:
        resolve_config(settings=run_settings, request=TrainRequest(output_name="pairs", model_family=family))
    assert needle in str(raised.value)
    assert ("b.jpg" in str(raised.value)) == (family is None)
