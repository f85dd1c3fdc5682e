"""Dataset folder rules owned by fluxtrain/datasets/store.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.datasets.store import read_caption, write_caption
from fluxtrain.settings import Settings


@pytest.mark.parametrize("name", ["ds.toml", "DS.TOML"])
def test_a_dataset_named_like_a_config_file_is_422_everywhere(client: TestClient, name: str) -> None:
    download = client.post(
        "/download-images", json={"urls": ["http://127.0.0.1:9/a.png"], "output_name": name}
    )
    assert download.status_code == 422
    assert ".toml" in download.json()["detail"]
    upload = client.post(f"/datasets/{name}/images", files={"files": ("a.png", b"x")})
    assert upload.status_code == 422


def test_config_and_dataset_never_collide(client: TestClient, settings: Settings) -> None:
    folder = settings.datasets_dir / "ds"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(folder / "a.jpg")
    assert (
        client.post("/create-dataset-config", json={"output_name": "ds", "trigger_word": "w"}).status_code
        == 200
    )
    again = client.post(
        "/download-images", json={"urls": ["http://127.0.0.1:9/a.png"], "output_name": "ds.toml"}
    )
    assert again.status_code == 422
    assert (settings.datasets_dir / "ds.toml").is_file()


def test_delete_removes_the_dataset_and_its_config(client: TestClient, settings: Settings) -> None:
    folder = settings.datasets_dir / "ds"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(folder / "a.jpg")
    assert (
        client.post("/create-dataset-config", json={"output_name": "ds", "trigger_word": "w"}).status_code
        == 200
    )
    assert client.delete("/datasets/ds").status_code == 200
    assert not folder.exists()
    assert not (settings.datasets_dir / "ds.toml").exists()


def test_captions_are_read_back_exactly(tmp_path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    write_caption(image, "  exact, text é  \n")
    assert read_caption(image) == "  exact, text é  \n"
