"""Reading a hand-written kohya dataset TOML: kohya's inheritance, its defaults, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxtrain.dataset_config.schema import cascaded_subset_options
from fluxtrain.dataset_config.toml_file import load_dataset_config, read_dataset_toml
from fluxtrain.errors import InvalidInputError, NotFoundError

KOHYA_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2
enable_bucket = true
max_bucket_reso = 768

  [[datasets.subsets]]
  image_dir = '/data/hoge'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = 'fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3
  num_repeats = 7
  flip_aug = false

[[datasets]]
resolution = [768, 512]

  [[datasets.subsets]]
  image_dir = '/data/piyo'
  caption_extension = '.caption'
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_subset_keys_inherit_from_dataset_then_general_then_kohya_defaults(tmp_path: Path) -> None:
    loaded = load_dataset_config(_write(tmp_path, KOHYA_EXAMPLE))
    assert loaded.path == tmp_path / "config.toml"
    first, second = loaded.datasets

    assert first.resolution == (512, 512)
    assert first.batch_size == 4
    assert first.enable_bucket is True
    assert (first.min_bucket_reso, first.max_bucket_reso, first.bucket_reso_steps) == (256, 768, 64)
    hoge, fuga = first.subsets
    assert hoge.image_dir == Path("/data/hoge")
    assert hoge.class_tokens == "hoge girl"
    assert hoge.keep_tokens == 2
    assert hoge.num_repeats == 1
    assert hoge.shuffle_caption is True
    assert hoge.flip_aug is True
    assert hoge.caption_extension == ".txt"
    assert fuga.image_dir == tmp_path / "fuga"
    assert fuga.keep_tokens == 3
    assert fuga.num_repeats == 7
    assert fuga.flip_aug is False

    assert second.resolution == (768, 512)
    assert second.batch_size == 1
    assert second.enable_bucket is False
    assert second.max_bucket_reso == 1024
    [piyo] = second.subsets
    assert piyo.keep_tokens == 1
    assert piyo.caption_extension == ".caption"
    assert piyo.class_tokens is None


def test_general_may_set_dataset_keys(tmp_path: Path) -> None:
    text = (
        "[general]\nresolution = 640\nbatch_size = 3\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/x'\n"
    )
    [dataset] = load_dataset_config(_write(tmp_path, text)).datasets
    assert dataset.resolution == (640, 640)
    assert dataset.batch_size == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '/x'\nbogus = 1\n", "bogus"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/x'\nresolution = 512\n", "resolution"),
        ("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nclass_tokens = 'a'\n", "image_dir"),
        (
            "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '/x'\nflip_aug = 1\n",
            "flip_aug",
        ),
        ("[[datasets]]\nresolution = [512]\n[[datasets.subsets]]\nimage_dir = '/x'\n", "resolution"),
        (
            "[[datasets]]\nresolution = 512\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = '/x'\n",
            "batch_size",
        ),
        ("[general]\nresolution = 512\n", "datasets"),
        ("[[datasets]]\nresolution = 512\n", "subsets"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/x'\n", "no resolution"),
        ("[[datasets]\nresolution = 512\n", "not valid TOML"),
    ],
)
def test_invalid_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_dataset_config(_write(tmp_path, text))


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_dataset_config(tmp_path / "nope.toml")


def test_the_cascade_of_subset_options_is_the_one_the_trainer_resolves(tmp_path: Path) -> None:
    path = _write(tmp_path, KOHYA_EXAMPLE)
    options = cascaded_subset_options(read_dataset_toml(path))
    loaded = load_dataset_config(path)
    resolved = {
        f"datasets[{d}].subsets[{s}]": subset.model_dump(exclude={"image_dir", "control_dir"})
        for d, dataset in enumerate(loaded.datasets)
        for s, subset in enumerate(dataset.subsets)
    }
    assert options == resolved
    assert options["datasets[0].subsets[1]"]["keep_tokens"] == 3
    assert options["datasets[0].subsets[0]"]["keep_tokens"] == 2
    assert options["datasets[1].subsets[0]"]["keep_tokens"] == 1


def test_a_file_without_datasets_cascades_its_general_section(tmp_path: Path) -> None:
    options = cascaded_subset_options(read_dataset_toml(_write(tmp_path, "[general]\nflip_aug = true\n")))
    assert list(options) == ["[general]"] and options["[general]"]["flip_aug"] is True
    assert options["[general]"]["num_repeats"] == 1
