"""`/train` refuses a dataset TOML whose options the trainer cannot honour, before any run exists."""

from __future__ import annotations

from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.settings import Settings
from fluxtrain.training.tiny import write_tiny_flux_files


def _models(settings: Settings) -> None:
    settings.models_root.mkdir(parents=True)
    write_tiny_flux_files(settings.models_root)


def test_train_answers_422_for_color_aug_set_by_create_dataset_config(
    client: TestClient, settings: Settings
) -> None:
    folder = settings.datasets_dir / "demo"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "teal").save(folder / "a.jpg")
    _models(settings)
    made = client.post(
        "/create-dataset-config", json={"output_name": "demo", "trigger_word": "zqx", "color_aug": True}
    )
    assert made.status_code == 200, made.text

    response = client.post("/train", json={"output_name": "demo", "max_train_steps": 2})
    assert response.status_code == 422, response.text
    detail = str(response.json())
    assert "color_aug" in detail and "cache" in detail
    assert not settings.runs_dir.exists() or not any(settings.runs_dir.iterdir())


def test_train_names_random_crop_of_a_hand_written_subset(client: TestClient, settings: Settings) -> None:
    settings.datasets_dir.mkdir(parents=True)
    (settings.datasets_dir / "hand.toml").write_text(
        '[[datasets]]\nresolution = 512\n\n[[datasets.subsets]]\nimage_dir = "/data/x"\nrandom_crop = true\n',
        encoding="utf-8",
    )
    _models(settings)
    response = client.post("/train", json={"output_name": "out", "dataset": "hand"})
    assert response.status_code == 422, response.text
    assert "datasets[0].subsets[0] sets random_crop" in str(response.json())


def test_train_refuses_a_key_kohya_does_not_know_before_a_run_exists(
    client: TestClient, settings: Settings
) -> None:
    settings.datasets_dir.mkdir(parents=True)
    (settings.datasets_dir / "typo.toml").write_text(
        '[[datasets]]\nresolution = 512\n\n[[datasets.subsets]]\nimage_dir = "/data/x"\nflip_agu = true\n',
        encoding="utf-8",
    )
    _models(settings)
    response = client.post("/train", json={"output_name": "out", "dataset": "typo"})
    assert response.status_code == 422, response.text
    assert "flip_agu" in str(response.json())
    assert not settings.runs_dir.exists() or not any(settings.runs_dir.iterdir())
