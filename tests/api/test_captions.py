"""POST /caption-images (seed contract) and PUT /datasets/{name}/captions/{image}, on the tiny Florence-2."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.api.app import create_app
from fluxtrain.captioning import florence as caption_model
from fluxtrain.captioning.captioner import Florence2Captioner
from fluxtrain.captioning.tiny import write_tiny_florence2
from fluxtrain.settings import Settings

FAST = {"max_new_tokens": 5, "num_beams": 1}


@pytest.fixture(scope="module")
def tiny_florence2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return write_tiny_florence2(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture
def api(settings: Settings, tiny_florence2: Path) -> Iterator[TestClient]:
    settings.caption_model = str(tiny_florence2)
    settings.caption_device = "cpu"
    caption_model.release_caption_models()
    with TestClient(create_app(settings)) as client:
        yield client
    caption_model.release_caption_models()


@pytest.fixture
def cats(settings: Settings) -> Path:
    folder = settings.datasets_dir / "cats"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "image1.jpg")
    Image.new("RGB", (40, 56), (30, 30, 200)).save(folder / "image2.jpg")
    return folder


def test_seed_request_answers_the_seed_response(api: TestClient, cats: Path) -> None:
    response = api.post("/caption-images", json={"output_name": "cats", "trigger_word": "photo"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["message"] == "Captions generated and saved"
    assert sorted(body["captions"]) == ["image1.jpg", "image2.jpg"]
    assert body["failed"] == {}
    for image, caption in body["captions"].items():
        assert caption.startswith("photo, ")
        assert (cats / image).with_suffix(".txt").read_text(encoding="utf-8") == caption


def test_optional_fields_and_resume(api: TestClient, cats: Path) -> None:
    (cats / "image1.txt").write_text("photo, by hand", encoding="utf-8")
    body = {"output_name": "cats", "trigger_word": "photo", "prompt": "<CAPTION>", **FAST}
    first = api.post("/caption-images", json=body).json()
    assert first["captions"]["image1.jpg"] == "photo, by hand"
    assert first["captions"]["image2.jpg"].startswith("photo, ")
    replaced = api.post("/caption-images", json={**body, "overwrite": True, "task": "<DETAILED_CAPTION>"})
    assert replaced.status_code == 200
    assert replaced.json()["captions"]["image1.jpg"] != "photo, by hand"


def test_the_model_is_loaded_once_across_requests(
    api: TestClient, cats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Path] = []
    real_load = caption_model._load

    def counting_load(folder: Path, device: torch.device) -> caption_model.CaptionModel:
        loads.append(folder)
        return real_load(folder, device)

    monkeypatch.setattr(caption_model, "_load", counting_load)
    body = {"output_name": "cats", "trigger_word": "photo", "overwrite": True, **FAST}
    assert api.post("/caption-images", json=body).status_code == 200
    assert api.post("/caption-images", json=body).status_code == 200
    assert len(loads) == 1


def test_a_corrupt_image_is_reported(api: TestClient, cats: Path) -> None:
    (cats / "broken.jpg").write_bytes(b"garbage, not a jpeg")
    response = api.post("/caption-images", json={"output_name": "cats", "trigger_word": "photo", **FAST})
    assert response.status_code == 200
    body = response.json()
    assert list(body["failed"]) == ["broken.jpg"]
    assert sorted(body["captions"]) == ["image1.jpg", "image2.jpg"]


def test_unknown_dataset_is_404(api: TestClient) -> None:
    response = api.post("/caption-images", json={"output_name": "nope", "trigger_word": "photo"})
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


def test_a_dataset_without_images_is_422(api: TestClient, settings: Settings) -> None:
    (settings.datasets_dir / "empty").mkdir(parents=True)
    response = api.post("/caption-images", json={"output_name": "empty", "trigger_word": "photo"})
    assert response.status_code == 422
    assert "no images" in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"output_name": "../cats", "trigger_word": "photo"},
        {"output_name": "cats", "trigger_word": ""},
        {"output_name": "cats", "trigger_word": "two\nlines"},
        {"output_name": "cats", "trigger_word": "tab\tword"},
        {"output_name": "cats", "trigger_word": "photo", "task": "<OD>"},
        {"output_name": "cats", "trigger_word": "photo", "prompt": "<OD>"},
        {"output_name": "cats", "trigger_word": "photo", "num_beams": 0},
        {"output_name": "cats", "trigger_word": "photo", "max_new_tokens": 100000},
    ],
)
def test_bad_requests_are_422(api: TestClient, cats: Path, body: dict) -> None:
    assert api.post("/caption-images", json=body).status_code == 422


def test_missing_model_is_503_with_a_clear_message(api: TestClient, cats: Path, settings: Settings) -> None:
    missing = settings.models_root / "no-such-florence"
    settings.caption_model = str(missing)
    response = api.post("/caption-images", json={"output_name": "cats", "trigger_word": "photo"})
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "FLUXTRAIN_CAPTION_MODEL" in detail
    assert str(missing) in detail
    assert "Traceback" not in response.text


def test_health_answers_while_captioning_runs(
    api: TestClient, cats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    real_generate = Florence2Captioner._generate_texts

    def held_generate(self, inputs, options):
        started.set()
        release.wait(timeout=10)
        return real_generate(self, inputs, options)

    monkeypatch.setattr(Florence2Captioner, "_generate_texts", held_generate)
    responses = []
    body = {"output_name": "cats", "trigger_word": "photo", **FAST}
    worker = threading.Thread(target=lambda: responses.append(api.post("/caption-images", json=body)))
    worker.start()
    try:
        assert started.wait(timeout=30)
        assert api.get("/health").status_code == 200
        assert worker.is_alive()
    finally:
        release.set()
        worker.join(timeout=30)
    assert responses[0].status_code == 200


def test_put_caption_writes_it_exactly(api: TestClient, cats: Path) -> None:
    text = "photo, a red square — drawn by hand "
    response = api.put("/datasets/cats/captions/image1.jpg", json={"caption": text})
    assert response.status_code == 200
    assert response.json() == {"dataset": "cats", "image": "image1.jpg", "caption": text}
    assert (cats / "image1.txt").read_text(encoding="utf-8") == text
    assert not [p for p in cats.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/datasets/cats/captions/missing.jpg", 404),
        ("/datasets/cats/captions/image1.txt", 404),
        ("/datasets/nope/captions/image1.jpg", 404),
        ("/datasets/cats/captions/.image1.jpg", 422),
        ("/datasets/%2E%2E/captions/image1.jpg", 422),
    ],
)
def test_put_caption_refuses_what_is_not_an_image_of_the_dataset(
    api: TestClient, cats: Path, path: str, status: int
) -> None:
    response = api.put(path, json={"caption": "x"})
    assert response.status_code == status
    assert not (cats / "image1.txt").exists()


@pytest.mark.parametrize(
    "path",
    [
        "/datasets/cats/captions/..",
        "/datasets/cats/captions/..%2F..%2Fsecret.jpg",
        "/datasets/..%2Fcats/captions/image1.jpg",
        "/datasets/cats/captions/%2E%2E%5Csecret.jpg",
    ],
)
def test_put_caption_traversal_names_never_write(
    api: TestClient, cats: Path, settings: Settings, path: str
) -> None:
    response = api.put(path, json={"caption": "x"})
    assert 400 <= response.status_code < 500
    written = [p for p in settings.data_root.rglob("*") if p.suffix == ".txt" or p.name == "secret.txt"]
    assert written == []


def test_put_caption_bounds_its_size(api: TestClient, cats: Path) -> None:
    response = api.put("/datasets/cats/captions/image1.jpg", json={"caption": "x" * 10_001})
    assert response.status_code == 422


def test_images_filter_captions_only_the_named_images(api: TestClient, cats: Path) -> None:
    body = {"output_name": "cats", "trigger_word": "photo", "images": ["image2.jpg"], **FAST}
    response = api.post("/caption-images", json=body)
    assert response.status_code == 200, response.text
    assert list(response.json()["captions"]) == ["image2.jpg"]
    assert (cats / "image2.txt").is_file() and not (cats / "image1.txt").exists()
    missing = api.post("/caption-images", json={**body, "images": ["nope.jpg"]})
    assert missing.status_code == 404 and "nope.jpg" in missing.json()["detail"]
    assert api.post("/caption-images", json={**body, "images": ["../x.jpg"]}).status_code == 422
    assert api.post("/caption-images", json={**body, "images": []}).status_code == 422
