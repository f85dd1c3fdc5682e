"""`POST /create-dataset-config`: the seed's answer, 404 and 422 cases, the API key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings


@pytest.fixture
def dataset_folder(settings: Settings) -> Path:
    folder = settings.datasets_dir / "my_dataset"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 120, 255)).save(folder / "a.jpg")
    return folder


def test_seed_request_answers_as_the_seed(
    client: TestClient, settings: Settings, dataset_folder: Path
) -> None:
    response = client.post(
        "/create-dataset-config",
        json={"output_name": "my_dataset", "trigger_word": "landscape", "num_repeats": 5, "resolution": 512},
    )
    assert response.status_code == 200
    expected = settings.datasets_dir / "my_dataset.toml"
    assert response.json() == {"message": "Dataset config created", "path": str(expected)}
    data = tomllib.loads(expected.read_text(encoding="utf-8"))
    assert data["datasets"][0]["resolution"] == 512
    assert data["datasets"][0]["batch_size"] == 1
    assert data["datasets"][0]["subsets"][0] == {
        "image_dir": str(dataset_folder),
        "class_tokens": "landscape",
        "num_repeats": 5,
    }


def test_optional_fields_reach_the_file(client: TestClient, settings: Settings, dataset_folder: Path) -> None:
    response = client.post(
        "/create-dataset-config",
        json={
            "output_name": "my_dataset",
            "trigger_word": "x",
            "enable_bucket": False,
            "shuffle_caption": True,
            "keep_tokens": 0,
            "caption_extension": ".cap",
            "color_aug": True,
        },
    )
    assert response.status_code == 200
    data = tomllib.loads(Path(response.json()["path"]).read_text(encoding="utf-8"))
    assert data["datasets"][0]["enable_bucket"] is False
    assert data["general"]["shuffle_caption"] is True
    assert data["general"]["keep_tokens"] == 0
    assert data["general"]["caption_extension"] == ".cap"
    assert data["general"]["color_aug"] is True


def test_missing_dataset_is_404(client: TestClient) -> None:
    response = client.post("/create-dataset-config", json={"output_name": "nope", "trigger_word": "x"})
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


def test_dataset_without_images_is_404(client: TestClient, settings: Settings) -> None:
    (settings.datasets_dir / "bare").mkdir(parents=True)
    response = client.post("/create-dataset-config", json={"output_name": "bare", "trigger_word": "x"})
    assert response.status_code == 404
    assert "no image" in response.json()["detail"]
    assert not (settings.datasets_dir / "bare.toml").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"resolution": 1000}, "resolution"),
        ({"resolution": 192}, "resolution"),
        ({"resolution": 4160}, "resolution"),
        ({"num_repeats": 0}, "num_repeats"),
        ({"batch_size": 0}, "batch_size"),
        ({"output_name": "../etc"}, "output_name"),
        ({"output_name": "a/b"}, "output_name"),
        ({"output_name": "a\\b"}, "output_name"),
        ({"output_name": ".hidden"}, "output_name"),
        ({"output_name": ""}, "output_name"),
        ({"output_name": "x" * 101}, "output_name"),
        ({"trigger_word": "   "}, "trigger_word"),
        ({"trigger_word": "a\nb"}, "trigger_word"),
        ({"trigger_word": "x" * 201}, "trigger_word"),
        ({"min_bucket_reso": 1024, "max_bucket_reso": 512, "resolution": 512}, "min_bucket_reso"),
        ({"max_bucket_reso": 768}, "max_bucket_reso (768)"),
        ({"min_bucket_reso": 300}, "multiple of bucket_reso_steps"),
        ({"bucket_reso_steps": 20}, "bucket_reso_steps"),
        ({"caption_extension": "txt"}, "caption_extension"),
        ({"caption_extension": ".t/x"}, "caption_extension"),
        ({"keep_tokens": -1}, "keep_tokens"),
    ],
)
def test_bad_values_are_422_with_the_reason(
    client: TestClient, settings: Settings, dataset_folder: Path, change: dict, field: str
) -> None:
    body = {"output_name": "my_dataset", "trigger_word": "x"} | change
    response = client.post("/create-dataset-config", json=body)
    assert response.status_code == 422
    reasons = " ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in response.json()["detail"])
    assert field in reasons
    assert not list(settings.datasets_dir.glob("*.toml"))


def test_api_key_is_required_when_set(settings: Settings, dataset_folder: Path) -> None:
    settings.api_key = SecretStr("k3y")
    body = {"output_name": "my_dataset", "trigger_word": "x"}
    with TestClient(create_app(settings)) as client:
        assert client.post("/create-dataset-config", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/create-dataset-config", json=body, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer k3y"}
        assert client.post("/create-dataset-config", json=body, headers=right).status_code == 200


@pytest.mark.parametrize("resolution", [256, 2048, 2112, 4096])
def test_every_resolution_of_the_documented_range_works_with_default_buckets(
    client: TestClient, settings: Settings, dataset_folder: Path, resolution: int
) -> None:
    response = client.post(
        "/create-dataset-config",
        json={"output_name": "my_dataset", "trigger_word": "w", "resolution": resolution},
    )
    assert response.status_code == 200, response.text
    data = tomllib.loads((settings.datasets_dir / "my_dataset.toml").read_text(encoding="utf-8"))
    assert data["datasets"][0]["max_bucket_reso"] == max(2048, resolution)


def test_explicit_max_bucket_below_the_resolution_is_422(client: TestClient, dataset_folder: Path) -> None:
    response = client.post(
        "/create-dataset-config",
        json={"output_name": "my_dataset", "trigger_word": "w", "resolution": 4096, "max_bucket_reso": 2048},
    )
    assert response.status_code == 422
    assert "max_bucket_reso" in response.text
