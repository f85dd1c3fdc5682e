"""Bad inputs the trainer meets in a run directory made by hand: each is refused before any work,
with a message that names the field or file, as an input error (exit 2), never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.datasets.store import list_images
from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import read_events
from fluxtrain.training.config import load_config
from fluxtrain.training.data import load_training_data
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers


def _train(run: Path) -> str:
    return Trainer(run, load_config(run / "run.json"), stop=StopFlag()).run()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return helpers.make_dataset(tmp_path / "data")


def _bad_models(tiny_models: Path, root: Path) -> Path:
    """A models root whose transformer entries are broken in each way a hand-made run meets."""
    root.mkdir()
    for name in ("ae.sft", "clip_l.safetensors", "t5xxl_fp16.safetensors", "tokenizers"):
        (root / name).symlink_to(tiny_models / name)
    (root / "noise.sft").write_bytes(b"\x93garbage that is no safetensors header" * 8)
    shutil.copy(tiny_models / "flux1-dev.sft", root / "model.ckpt")
    whole = (tiny_models / "flux1-dev.sft").read_bytes()
    (root / "truncated.sft").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("noise.sft", "not a readable safetensors file"),
        ("model.ckpt", "must be a .sft or .safetensors file"),
        ("truncated.sft", "not a readable safetensors file"),
        ("tokenizers", "not a diffusers model"),
        ("ae.sft", "holds no FLUX transformer weights"),
    ],
)
def test_a_broken_transformer_is_an_input_error_before_caching(
    tiny_models: Path, tmp_path: Path, dataset: Path, model: str, expected: str
) -> None:
    models = _bad_models(tiny_models, tmp_path / "models")
    run = helpers.make_run(
        tmp_path / "run", models=models, toml=dataset, cache=tmp_path / "cache", pretrained_model=model
    )
    with pytest.raises(InvalidInputError, match=f"pretrained_model: '{model}' .*{expected}"):
        _train(run)
    assert not (tmp_path / "cache").exists()


def test_the_process_reports_it_with_exit_2_and_no_traceback(
    tiny_models: Path, tmp_path: Path, dataset: Path
) -> None:
    models = _bad_models(tiny_models, tmp_path / "models")
    run = helpers.make_run(
        tmp_path / "run", models=models, toml=dataset, cache=tmp_path / "cache", pretrained_model="noise.sft"
    )
    command = [sys.executable, "-m", "fluxtrain.training", str(run)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: pretrained_model: 'noise.sft' is not a readable safetensors file" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    error = read_events(run / "events.jsonl")[-1]
    assert error["event"] == "error" and error["kind"] == "input" and "noise.sft" in error["message"]


def test_a_corrupt_image_is_named(tmp_path: Path, dataset: Path) -> None:
    broken = dataset.parent / "images" / "c.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(InvalidInputError, match=r"image .*c\.png cannot be read"):
        load_training_data(dataset)


def test_an_image_that_cannot_be_opened_is_named(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = dataset.parent / "images" / "b.jpg"
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path == gone:
            raise PermissionError(13, "Permission denied")
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(InvalidInputError, match=rf"image .*{gone.name} cannot be read: Permission denied"):
        load_training_data(dataset)


def test_only_files_of_kohyas_image_suffixes_train_and_the_listing_shows_the_same(dataset: Path) -> None:
    """A folder named like an image, and a GIF or TIFF put in by hand, neither train nor show."""
    images = dataset.parent / "images"
    (images / "folder.jpg").mkdir()
    for name in ("still.gif", "scan.tif"):
        Image.new("RGB", (64, 64), (1, 2, 3)).save(images / name)
    assert [image.path.name for image in load_training_data(dataset).images] == ["a.jpg", "b.jpg"]
    assert [path.name for path in list_images(images)] == ["a.jpg", "b.jpg"]


def test_txt_captions_are_read_when_the_toml_keeps_kohyas_default_extension(
    tmp_path: Path, dataset: Path
) -> None:
    text = dataset.read_text(encoding="utf-8").replace('caption_extension = ".txt"\n', "")
    dataset.write_text(text, encoding="utf-8")
    data = load_training_data(dataset)
    assert [image.captions[0] for image in data.images] == [
        f"{helpers.TRIGGER}, red and blue stripes",
        f"{helpers.TRIGGER}, a green disc",
    ]
    (dataset.parent / "images" / "b.caption").write_text("zqx, from the caption file", encoding="utf-8")
    assert load_training_data(dataset).images[1].captions[0] == "zqx, from the caption file"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_train_steps", "10", "valid integer"),
        ("network_dim", True, "valid integer"),
        ("enable_bucket", "yes", "valid boolean"),
        ("seed", 3.0, "valid integer"),
        ("learning_rate", float("nan"), "finite number"),
        ("learning_rate", "1e-4", "valid number"),
        ("dataset_config", "relative/set.toml", "must be an absolute path"),
        ("models_root", "models", "must be an absolute path"),
        ("mixed_precision", "fp16", "overflow float16"),
    ],
)
def test_run_json_is_validated_strictly(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"output_name": "x", field: value}), encoding="utf-8")
    with pytest.raises(InvalidInputError, match=f"{field}: .*{message}"):
        load_config(path)


def test_run_json_as_the_runs_layer_writes_passes(tiny_models: Path, tmp_path: Path, dataset: Path) -> None:
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=dataset, cache=tmp_path / "cache", learning_rate=1
    )
    config = load_config(run / "run.json")
    assert config.learning_rate == 1.0 and config.dataset_config == dataset


def test_resume_with_other_lora_settings_names_them(tiny_models: Path, tmp_path: Path, dataset: Path) -> None:
    run = helpers.make_run(
        tmp_path / "run",
        models=tiny_models,
        toml=dataset,
        cache=tmp_path / "cache",
        max_train_epochs=2,
        save_every_n_epochs=1,
    )
    assert _train(run) == "finished"
    assert (run / "state").is_dir()
    config = json.loads((run / "run.json").read_text(encoding="utf-8"))
    (run / "run.json").write_text(json.dumps({**config, "network_dim": 8}), encoding="utf-8")
    with pytest.raises(InvalidInputError, match=r"network_dim 4 -> 8.*remove state/"):
        _train(run)
