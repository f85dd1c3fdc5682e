"""Writing a dataset's TOML: content read back with tomllib, kohya's section rules, 404s, atomicity."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.schema import (
    DatasetOptions,
    DatasetSection,
    GeneralSection,
    KohyaDatasetToml,
    SubsetSection,
)
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.dataset_config.toml_file import load_dataset_config, parse_dataset_toml, render_dataset_toml
from fluxtrain.errors import NotFoundError
from fluxtrain.settings import Settings

# Keys kohya sd-scripts (library/config_util.py, DreamBooth datasets with dropout support) accepts
# in each section, and the Python type its schema checks them against.
KOHYA_SUBSET_INHERITABLE = {
    "color_aug": bool,
    "face_crop_aug_range": list,
    "flip_aug": bool,
    "num_repeats": int,
    "random_crop": bool,
    "shuffle_caption": bool,
    "keep_tokens": int,
    "keep_tokens_separator": str,
    "secondary_separator": str,
    "enable_wildcard": bool,
    "token_warmup_min": int,
    "token_warmup_step": (int, float),
    "caption_prefix": str,
    "caption_suffix": str,
    "caption_dropout_every_n_epochs": int,
    "caption_dropout_rate": (int, float),
    "caption_tag_dropout_rate": (int, float),
    "caption_extension": str,
    "class_tokens": str,
    "cache_info": bool,
}
KOHYA_DATASET_ONLY = {
    "batch_size": int,
    "bucket_no_upscale": bool,
    "bucket_reso_steps": int,
    "enable_bucket": bool,
    "max_bucket_reso": int,
    "min_bucket_reso": int,
    "resolution": (int, list),
    "network_multiplier": float,
}
KOHYA_GENERAL = KOHYA_SUBSET_INHERITABLE | KOHYA_DATASET_ONLY
KOHYA_DATASET = KOHYA_GENERAL | {"subsets": list}
KOHYA_SUBSET = KOHYA_SUBSET_INHERITABLE | {"image_dir": str, "is_reg": bool}


def _check_kohya_section(section: dict, allowed: dict[str, type | tuple[type, ...]]) -> None:
    for key, value in section.items():
        assert key in allowed, f"kohya does not accept {key!r} here"
        assert isinstance(value, allowed[key]), f"{key}={value!r} has the wrong type for kohya"
        if allowed[key] is int:
            assert not isinstance(value, bool)


def test_toml_holds_every_requested_value_in_kohyas_sections(
    settings: Settings, dataset_folder: Path
) -> None:
    request = DatasetConfig(
        output_name="cats",
        trigger_word="mycat",
        num_repeats=5,
        resolution=512,
        batch_size=2,
        enable_bucket=True,
        min_bucket_reso=320,
        max_bucket_reso=1536,
        bucket_reso_steps=32,
        shuffle_caption=True,
        keep_tokens=2,
        caption_extension=".caption",
        flip_aug=True,
        color_aug=False,
        random_crop=True,
    )
    path = create_dataset_config(settings=settings, request=request)

    assert path == settings.datasets_dir / "cats.toml"
    assert path.is_absolute()
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {"general", "datasets"}
    assert data["general"] == {
        "shuffle_caption": True,
        "caption_extension": ".caption",
        "keep_tokens": 2,
        "flip_aug": True,
        "color_aug": False,
        "random_crop": True,
    }
    [dataset] = data["datasets"]
    assert dataset["resolution"] == 512
    assert dataset["batch_size"] == 2
    assert dataset["enable_bucket"] is True
    assert dataset["min_bucket_reso"] == 320
    assert dataset["max_bucket_reso"] == 1536
    assert dataset["bucket_reso_steps"] == 32
    [subset] = dataset["subsets"]
    assert subset == {"image_dir": str(dataset_folder), "class_tokens": "mycat", "num_repeats": 5}
    assert Path(subset["image_dir"]).is_absolute()

    _check_kohya_section(data["general"], KOHYA_GENERAL)
    _check_kohya_section({k: v for k, v in dataset.items()}, KOHYA_DATASET)
    _check_kohya_section(subset, KOHYA_SUBSET)


def test_defaults_match_the_seed(settings: Settings, dataset_folder: Path) -> None:
    path = create_dataset_config(
        settings=settings, request=DatasetConfig(output_name="cats", trigger_word="c")
    )
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["general"] == {
        "shuffle_caption": False,
        "caption_extension": ".txt",
        "keep_tokens": 1,
        "flip_aug": False,
        "color_aug": False,
        "random_crop": False,
    }
    dataset = data["datasets"][0]
    assert {k: v for k, v in dataset.items() if k != "subsets"} == {
        "resolution": 1024,
        "batch_size": 1,
        "enable_bucket": True,
        "min_bucket_reso": 256,
        "max_bucket_reso": 2048,
        "bucket_reso_steps": 64,
    }
    assert dataset["subsets"][0]["num_repeats"] == 10


def test_our_sections_only_declare_keys_kohya_accepts() -> None:
    """Kohya's keys, plus musubi-tuner's edit-pair keys (written only for a dataset with controls)."""
    assert set(GeneralSection.model_fields) <= set(KOHYA_GENERAL) | set(MUSUBI_CONTROL_DATASET)
    assert set(DatasetOptions.model_fields) <= set(KOHYA_DATASET_ONLY) | set(MUSUBI_CONTROL_DATASET)
    assert set(SubsetSection.model_fields) <= set(KOHYA_SUBSET) | {"control_directory"}


def test_trigger_word_with_toml_specials_round_trips(settings: Settings, dataset_folder: Path) -> None:
    word = 'my "cat" \\ [x] = \u00e9'
    path = create_dataset_config(
        settings=settings, request=DatasetConfig(output_name="cats", trigger_word=word)
    )
    assert (
        tomllib.loads(path.read_text(encoding="utf-8"))["datasets"][0]["subsets"][0]["class_tokens"] == word
    )


def test_trigger_word_that_utf8_cannot_hold_is_refused_before_writing() -> None:
    with pytest.raises(ValidationError, match="valid Unicode"):
        DatasetConfig(output_name="cats", trigger_word="a\ud800b")


def test_written_file_loads_back_resolved(settings: Settings, dataset_folder: Path) -> None:
    request = DatasetConfig(output_name="cats", trigger_word="mycat", resolution=768, num_repeats=3)
    loaded = load_dataset_config(create_dataset_config(settings=settings, request=request))
    [dataset] = loaded.datasets
    assert dataset.resolution == (768, 768)
    assert dataset.enable_bucket is True
    assert dataset.max_bucket_reso == 2048
    [subset] = dataset.subsets
    assert subset.image_dir == dataset_folder
    assert subset.class_tokens == "mycat"
    assert subset.num_repeats == 3
    assert subset.caption_extension == ".txt"
    assert subset.keep_tokens == 1


def test_writing_again_replaces_and_leaves_no_temporary_file(
    settings: Settings, dataset_folder: Path
) -> None:
    create_dataset_config(settings=settings, request=DatasetConfig(output_name="cats", trigger_word="old"))
    path = create_dataset_config(
        settings=settings, request=DatasetConfig(output_name="cats", trigger_word="new", batch_size=4)
    )
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["datasets"][0]["subsets"][0]["class_tokens"] == "new"
    assert data["datasets"][0]["batch_size"] == 4
    assert sorted(p.name for p in settings.datasets_dir.iterdir()) == ["cats", "cats.toml"]
    assert sorted(p.name for p in dataset_folder.iterdir()) == ["cat1.jpg", "cat1.txt"]


def test_failed_write_keeps_the_old_file(
    settings: Settings, dataset_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = create_dataset_config(
        settings=settings, request=DatasetConfig(output_name="cats", trigger_word="old")
    )
    before = path.read_bytes()

    def refuse(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("fluxtrain.fsutil.os.replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        create_dataset_config(
            settings=settings, request=DatasetConfig(output_name="cats", trigger_word="new")
        )
    assert path.read_bytes() == before
    assert sorted(p.name for p in settings.datasets_dir.iterdir()) == ["cats", "cats.toml"]


def test_missing_dataset_is_not_found(settings: Settings) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        create_dataset_config(settings=settings, request=DatasetConfig(output_name="dogs", trigger_word="d"))
    assert not (settings.datasets_dir / "dogs.toml").exists()


def test_dataset_without_images_is_not_found(settings: Settings) -> None:
    folder = settings.datasets_dir / "empty"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}", encoding="utf-8")
    (folder / "a.txt").write_text("caption only", encoding="utf-8")
    (folder / ".a.jpg.tmp").write_bytes(b"partial")
    with pytest.raises(NotFoundError, match="holds no image"):
        create_dataset_config(settings=settings, request=DatasetConfig(output_name="empty", trigger_word="e"))
    assert not (settings.datasets_dir / "empty.toml").exists()


def test_every_table_is_a_section_header_not_an_inline_table(
    settings: Settings, dataset_folder: Path
) -> None:
    """kohya parses with the `toml` package, which rejects arrays of inline tables."""
    request = DatasetConfig(output_name="cats", trigger_word="mycat")
    text = create_dataset_config(settings=settings, request=request).read_text(encoding="utf-8")
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("[")] == [
        "[general]",
        "[[datasets]]",
        "[[datasets.subsets]]",
    ]
    assert not [line for line in lines if line.lstrip().startswith("subsets")]
    assert lines[lines.index("[[datasets.subsets]]") + 1] == f'image_dir = "{dataset_folder}"'


def test_render_and_parse_round_trip_several_datasets() -> None:
    document = KohyaDatasetToml(
        general=GeneralSection(keep_tokens=1, resolution=512),
        datasets=[
            DatasetSection(subsets=[SubsetSection(image_dir="/a", class_tokens="a")]),
            DatasetSection(
                resolution=[768, 512],
                subsets=[SubsetSection(image_dir="/b"), SubsetSection(image_dir="/c", keep_tokens=3)],
            ),
        ],
    )
    text = render_dataset_toml(document)
    assert text.count("[[datasets]]") == 2
    assert text.count("[[datasets.subsets]]") == 3
    assert parse_dataset_toml(text) == document


# musubi-tuner's edit-pair keys (docs/dataset_config.md) and their types.
MUSUBI_CONTROL_DATASET = {"control_resolution": (int, list), "no_resize_control": bool}


def test_an_edit_pair_dataset_writes_musubis_control_keys_and_reads_them_back(
    settings: Settings, dataset_folder: Path
) -> None:
    (dataset_folder / "control").mkdir()
    (dataset_folder / "control" / "cat1.jpg").write_bytes((dataset_folder / "cat1.jpg").read_bytes())
    request = DatasetConfig(
        output_name="cats", trigger_word="c", control_resolution=512, no_resize_control=True
    )

    path = create_dataset_config(settings=settings, request=request)

    [dataset] = tomllib.loads(path.read_text(encoding="utf-8"))["datasets"]
    [subset] = dataset["subsets"]
    assert subset["control_directory"] == str(dataset_folder / "control")
    assert (dataset["control_resolution"], dataset["no_resize_control"]) == (512, True)
    _check_kohya_section({k: v for k, v in dataset.items() if k not in MUSUBI_CONTROL_DATASET}, KOHYA_DATASET)
    _check_kohya_section({k: dataset[k] for k in MUSUBI_CONTROL_DATASET}, MUSUBI_CONTROL_DATASET)
    [spec] = load_dataset_config(path).datasets
    assert spec.subsets[0].control_dir == dataset_folder / "control"
    assert (spec.control_resolution, spec.no_resize_control) == ((512, 512), True)


def test_a_dataset_without_controls_writes_no_control_key(settings: Settings, dataset_folder: Path) -> None:
    request = DatasetConfig(output_name="cats", trigger_word="c", control_resolution=512)
    text = create_dataset_config(settings=settings, request=request).read_text(encoding="utf-8")
    assert "control_directory" not in text and "control_resolution" not in text
