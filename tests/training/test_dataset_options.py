"""color_aug and random_crop cannot work on cached latents: refused by name, never ignored."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import read_events
from fluxtrain.training.config import check_dataset_for_training
from fluxtrain.training.data import load_training_data
from tests.training import helpers_runs as helpers

SUBSET = '[[datasets]]\nresolution = 64\n\n  [[datasets.subsets]]\n  image_dir = "/nowhere"\n'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[general]\ncolor_aug = true\n\n" + SUBSET, "datasets[0].subsets[0] sets color_aug"),
        (SUBSET + "  random_crop = true\n", "datasets[0].subsets[0] sets random_crop"),
        ("[general]\ncolor_aug = true\nrandom_crop = true\n", "[general] sets color_aug and random_crop"),
        (
            "[general]\nrandom_crop = true\n\n" + SUBSET + "  random_crop = false\n" + SUBSET,
            "datasets[1].subsets[0] sets random_crop",
        ),
    ],
)
def test_per_step_options_are_refused_through_the_cascade(text: str, named: str, tmp_path: Path) -> None:
    toml = tmp_path / "set.toml"
    toml.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInputError, match="cache") as caught:
        check_dataset_for_training(toml)
    assert named in caught.value.message
    assert caught.value.message.count(" sets ") == 1


def test_overridden_or_absent_options_pass(tmp_path: Path) -> None:
    toml = tmp_path / "set.toml"
    toml.write_text("[general]\ncolor_aug = true\n\n" + SUBSET + "  color_aug = false\n", encoding="utf-8")
    check_dataset_for_training(toml)
    toml.write_text("[general]\n", encoding="utf-8")
    check_dataset_for_training(toml)
    toml.write_text("[general\n", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        check_dataset_for_training(toml)


def test_trainer_refuses_them_with_an_error_event_and_exit_2(tiny_models: Path, tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data", color_aug=True)
    with pytest.raises(InvalidInputError, match="color_aug"):
        load_training_data(toml)
    run = helpers.make_run(tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "fluxtrain.training", str(run)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "datasets[0].subsets[0] sets color_aug" in result.stderr
    error = read_events(run / "events.jsonl")[-1]
    assert error["event"] == "error" and error["kind"] == "input" and "color_aug" in error["message"]
    assert not (run / "output").exists()
