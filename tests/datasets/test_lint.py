"""Dataset lint: each kind of finding on a dataset made to have it, and the settings it judges by."""

from __future__ import annotations

import io
import shutil

import pytest
from PIL import Image

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.datasets.lint import LintReport
from fluxtrain.datasets.lint_service import LintRequest, lint_dataset, lint_run_dataset
from fluxtrain.errors import NotFoundError
from fluxtrain.settings import Settings
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.tiny import write_tiny_flux_files, write_tiny_tokenizers
from tests.datasets.pictures import add_image, picture


@pytest.fixture
def lint_settings(settings: Settings) -> Settings:
    write_tiny_tokenizers(settings.models_root)
    return settings


def _lint(settings: Settings, name: str, **fields: object) -> LintReport:
    return lint_dataset(settings=settings, name=name, request=LintRequest(**fields))


def _kinds(report: LintReport) -> dict[str, list[str]]:
    return {finding.kind: finding.files for finding in report.findings}


def test_each_kind_of_problem_is_found_in_the_files_that_have_it(lint_settings: Settings) -> None:
    folder = lint_settings.datasets_dir / "flawed"
    for index in range(5):
        add_image(folder, f"good{index}.jpg", picture(index, (512, 512)), f"zqx, picture {index}")
    shutil.copy(folder / "good0.jpg", folder / "dup.jpg")
    encoded = io.BytesIO()
    picture(1, (512, 512)).save(encoded, "JPEG", quality=40)
    add_image(folder, "near.png", Image.open(encoded).resize((640, 640)), "zqx, a re-encoded copy")
    add_image(folder, "small.jpg", picture(10, (200, 150)), "zqx, tiny")
    add_image(folder, "soft.jpg", picture(11, (400, 400)), "zqx, enlarged")
    add_image(folder, "wide.jpg", picture(12, (2400, 400)), "zqx, a panorama")
    add_image(folder, "nocap.jpg", picture(13, (512, 512)))
    add_image(folder, "blank.jpg", picture(14, (512, 512)), "  \n")
    add_image(folder, "notrigger.jpg", picture(15, (512, 512)), "a picture of something")
    add_image(folder, "long.jpg", picture(16, (512, 512)), "zqx, " + "photo " * 600)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    add_image(folder, "latin.jpg", picture(17, (512, 512)))
    (folder / "latin.txt").write_bytes(b"zqx, caf\xe9 in Latin-1")

    report = _lint(lint_settings, "flawed", trigger_word="zqx", resolution=512)

    assert _kinds(report) == {
        "unreadable_image": ["broken.jpg"],
        "unreadable_caption": ["latin.jpg"],
        "too_small": ["small.jpg"],
        "upscaled": ["soft.jpg"],
        "aspect_ratio": ["wide.jpg"],
        "exact_duplicate": ["dup.jpg", "good0.jpg"],
        "near_duplicate": ["good1.jpg", "near.png"],
        "caption_missing": ["dup.jpg", "nocap.jpg"],
        "caption_empty": ["blank.jpg"],
        "trigger_word_missing": ["notrigger.jpg"],
        "caption_too_long": ["long.jpg"],
    }
    assert (report.images, report.errors, report.warnings, report.token_limit) == (16, 2, 9, 512)
    assert [f.severity for f in report.findings[:3]] == ["error", "error", "warning"]
    assert "broken.jpg (not an image Pillow can read)" in report.error_message()
    messages = {finding.kind: finding.message for finding in report.findings}
    assert "200x150" in messages["too_small"] and "1.28x" in messages["upscaled"]
    assert "6.00:1" in messages["aspect_ratio"] and "(605 tokens)" in messages["caption_too_long"]
    assert report.config is None


def test_an_empty_and_a_missing_folder_are_errors(lint_settings: Settings) -> None:
    (lint_settings.datasets_dir / "empty").mkdir(parents=True)
    (lint_settings.datasets_dir / "empty.toml").write_text(
        '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "empty"\n'
        '[[datasets.subsets]]\nimage_dir = "gone"\n',
        encoding="utf-8",
    )
    report = _lint(lint_settings, "empty")
    assert [(f.kind, f.severity) for f in report.findings] == [
        ("image_dir_missing", "error"),
        ("no_images", "error"),
    ]
    assert "datasets[0].subsets[1].image_dir" in report.findings[0].message
    with pytest.raises(NotFoundError):
        _lint(lint_settings, "nope")


def test_the_toml_gives_buckets_trigger_word_and_other_folders(lint_settings: Settings) -> None:
    main = lint_settings.datasets_dir / "main"
    add_image(main, "a.jpg", picture(1, (256, 256)), "zqx, first")
    add_image(main, "b.jpg", picture(2, (512, 256)), "a caption without it")
    create_dataset_config(
        settings=lint_settings,
        request=DatasetConfig(output_name="main", trigger_word="zqx", resolution=256, enable_bucket=False),
    )
    add_image(lint_settings.datasets_dir / "extra", "c.jpg", picture(3, (256, 256)), "nothing here")
    toml = lint_settings.datasets_dir / "main.toml"
    toml.write_text(
        toml.read_text() + '\n[[datasets.subsets]]\nimage_dir = "extra"\nclass_tokens = "zqx"\n',
        encoding="utf-8",
    )
    report = _lint(lint_settings, "main")
    assert report.config == str(toml)
    found = _kinds(report)
    assert found["trigger_word_missing"] == ["b.jpg", "extra/c.jpg"]
    assert "512x256 -> 256x256" in next(f.message for f in report.findings if f.kind == "aspect_ratio")
    assert "upscaled" not in found
    larger = _kinds(_lint(lint_settings, "main", resolution=512))
    assert larger["too_small"] == ["a.jpg", "b.jpg", "extra/c.jpg"]


def test_token_limit_follows_the_transformer_and_a_missing_tokenizer_is_said(settings: Settings) -> None:
    add_image(settings.datasets_dir / "words", "a.jpg", picture(1, (512, 512)), "zqx, " + "photo " * 300)
    missing = _lint(settings, "words", resolution=512, max_train_steps=10)
    assert _kinds(missing) == {"tokenizer_missing": [], "too_few_images": []}
    assert "t5xxl tokenizer folder" in missing.findings[0].message

    write_tiny_flux_files(settings.models_root)
    assert "caption_too_long" not in _kinds(_lint(settings, "words", resolution=512))
    write_tiny_flux_files(settings.models_root, guidance=False)
    schnell = _lint(settings, "words", resolution=512)
    assert schnell.token_limit == 256 and _kinds(schnell)["caption_too_long"] == ["a.jpg"]


def test_too_few_images_and_too_many_steps_for_them(lint_settings: Settings) -> None:
    folder = lint_settings.datasets_dir / "few"
    for index in range(3):
        add_image(folder, f"{index}.jpg", picture(index, (512, 512)), f"zqx, view {index}")
    create_dataset_config(
        settings=lint_settings,
        request=DatasetConfig(output_name="few", trigger_word="zqx", resolution=512, num_repeats=1),
    )
    assert set(_kinds(_lint(lint_settings, "few", max_train_steps=30))) == {"too_few_images"}
    report = _lint(lint_settings, "few", max_train_steps=2000)
    assert set(_kinds(report)) == {"too_few_images", "too_many_steps"}
    assert "about 667 times" in report.findings[-1].message

    toml = lint_settings.datasets_dir / "few.toml"
    config = TrainConfig(dataset_config=toml, output_name="x", max_train_epochs=500)
    assert "too_many_steps" in _kinds(lint_run_dataset(settings=lint_settings, config=config))


def test_a_jpeg_rotated_by_exif_is_judged_upright(lint_settings: Settings) -> None:
    folder = lint_settings.datasets_dir / "turned"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(1, (4000, 400)).save(folder / "a.jpg", exif=exif)
    (folder / "a.txt").write_text("zqx, turned")
    message = next(f.message for f in _lint(lint_settings, "turned").findings if f.kind == "aspect_ratio")
    assert "400x4000" in message
