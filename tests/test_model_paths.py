"""The model-path rule shared by `/train` and the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.model_paths import resolve_model_path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "ae.sft").write_bytes(b"x")
    return root


def test_relative_paths_stay_under_the_root(models: Path) -> None:
    assert resolve_model_path(models, "ae", "vae/ae.sft") == models / "vae" / "ae.sft"
    assert resolve_model_path(models, "ae", "vae/../vae/ae.sft") == models / "vae" / "ae.sft"
    assert resolve_model_path(models, "ae", "vae") == models / "vae"


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("../outside.sft", "ae: '../outside.sft' leaves the models folder"),
        ("vae/../../outside.sft", "leaves the models folder"),
        (".", "leaves the models folder"),
        ("/etc/passwd", "ae: '/etc/passwd' must be a path relative to the models folder"),
        ("", "ae: must be a non-empty path"),
        ("a\x00b", "ae: must be a non-empty path"),
    ],
)
def test_climbing_out_and_absolute_paths_are_refused(models: Path, value: str, needle: str) -> None:
    (models.parent / "outside.sft").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match=needle.replace(".", r"\.")):
        resolve_model_path(models, "ae", value)


def test_an_absolute_path_inside_the_root_is_refused_too(models: Path) -> None:
    with pytest.raises(InvalidInputError, match="relative"):
        resolve_model_path(models, "ae", str(models / "vae" / "ae.sft"))


def test_a_missing_file_is_not_found_naming_field_and_root(models: Path) -> None:
    with pytest.raises(NotFoundError) as caught:
        resolve_model_path(models, "clip_l", "clip_l.safetensors")
    assert caught.value.message == f"clip_l: model file 'clip_l.safetensors' not found in {models}"


def test_a_link_placed_inside_the_root_is_followed_out_of_it(models: Path, tmp_path: Path) -> None:
    shared = tmp_path / "nfs" / "flux"
    shared.mkdir(parents=True)
    (shared / "flux1-dev.sft").write_bytes(b"x")
    (models / "shared").symlink_to(shared, target_is_directory=True)
    (models / "flux.sft").symlink_to(shared / "flux1-dev.sft")
    assert resolve_model_path(models, "pretrained_model", "shared/flux1-dev.sft").read_bytes() == b"x"
    assert resolve_model_path(models, "pretrained_model", "flux.sft").read_bytes() == b"x"


def test_a_dangling_link_is_not_found(models: Path, tmp_path: Path) -> None:
    (models / "gone.sft").symlink_to(tmp_path / "nowhere.sft")
    with pytest.raises(NotFoundError):
        resolve_model_path(models, "ae", "gone.sft")
