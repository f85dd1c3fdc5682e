"""One image of a dataset over HTTP: thumbnails (cached, never the full image), download, delete."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings


def _dataset(settings: Settings) -> Path:
    folder = settings.datasets_dir / "pets"
    folder.mkdir(parents=True)
    Image.new("RGB", (1200, 600), (200, 30, 30)).save(folder / "big.jpg", quality=95)
    Image.new("RGB", (40, 30), (30, 200, 30)).save(folder / "small.jpg")
    (folder / "big.txt").write_text("zqx, red")
    manifest = {"big.jpg": {"url": "http://x/big"}, "small.jpg": {"url": "http://x/small"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_thumbnail_is_a_small_cached_jpeg_outside_the_dataset(client: TestClient, settings: Settings) -> None:
    folder = _dataset(settings)
    response = client.get("/datasets/pets/thumbnails/big.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (256, 128)
    assert len(response.content) < (folder / "big.jpg").stat().st_size
    cached = list((settings.data_root / "thumbnails" / "pets").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == response.content
    assert sorted(p.name for p in folder.iterdir()) == ["big.jpg", "big.txt", "manifest.json", "small.jpg"]
    assert client.get("/datasets/pets/thumbnails/big.jpg").content == response.content
    with Image.open(io.BytesIO(client.get("/datasets/pets/thumbnails/small.jpg").content)) as small:
        assert small.size == (40, 30)


def test_a_replaced_image_gets_a_new_thumbnail(client: TestClient, settings: Settings) -> None:
    folder = _dataset(settings)
    first = client.get("/datasets/pets/thumbnails/small.jpg").content
    Image.new("RGB", (80, 20), (0, 0, 250)).save(folder / "small.jpg")
    second = client.get("/datasets/pets/thumbnails/small.jpg")
    assert second.content != first
    with Image.open(io.BytesIO(second.content)) as thumb:
        assert thumb.size == (80, 20)
    assert len(list((settings.data_root / "thumbnails" / "pets").glob("small.*"))) == 1


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (lambda: _jpeg(Image.new("RGB", (64, 64), (9, 9, 9)))[:300], "cannot be decoded"),
        (lambda: b"", "cannot be decoded"),
        (lambda: b"hello, not a picture\n", "cannot be decoded"),
        (lambda: _jpeg(Image.new("RGB", (400, 300))), "decompression bomb: 400x300 is 120000 pixels"),
    ],
    ids=["truncated", "empty", "text", "over-the-pixel-bound"],
)
def test_a_file_that_makes_no_thumbnail_is_a_422_naming_it(
    settings: Settings, content: Callable[[], bytes], why: str
) -> None:
    """Files put into a dataset folder by hand: the grid asks for every thumbnail, so none may 500."""
    folder = _dataset(settings)
    (folder / "odd.jpg").write_bytes(content())
    limited = settings.model_copy(update={"max_image_pixels": 100_000})
    with TestClient(create_app(limited)) as client:
        response = client.get("/datasets/pets/thumbnails/odd.jpg")
        assert response.status_code == 422
        assert response.json()["detail"].startswith("no thumbnail of odd.jpg: ")
        assert why in response.json()["detail"]
        assert client.get("/datasets/pets/thumbnails/small.jpg").status_code == 200
    assert [p.name.split(".")[0] for p in (settings.data_root / "thumbnails" / "pets").iterdir()] == ["small"]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_full_image_download(client: TestClient, settings: Settings) -> None:
    folder = _dataset(settings)
    response = client.get("/datasets/pets/images/big.jpg")
    assert response.status_code == 200
    assert response.content == (folder / "big.jpg").read_bytes()


def test_delete_image_removes_caption_manifest_entry_and_thumbnail(
    client: TestClient, settings: Settings
) -> None:
    folder = _dataset(settings)
    client.get("/datasets/pets/thumbnails/big.jpg")
    response = client.delete("/datasets/pets/images/big.jpg")
    assert response.status_code == 200
    assert response.json() == {"message": "Image deleted", "dataset": "pets", "image": "big.jpg"}
    assert not (folder / "big.jpg").exists() and not (folder / "big.txt").exists()
    assert json.loads((folder / "manifest.json").read_text()) == {"small.jpg": {"url": "http://x/small"}}
    assert list((settings.data_root / "thumbnails" / "pets").iterdir()) == []
    assert [i["file"] for i in client.get("/datasets/pets").json()["images"]] == ["small.jpg"]
    assert client.delete("/datasets/pets/images/big.jpg").status_code == 404


def test_unknown_or_unsafe_names_are_refused(client: TestClient, settings: Settings) -> None:
    _dataset(settings)
    for path in ("thumbnails", "images"):
        assert client.get(f"/datasets/pets/{path}/nope.jpg").status_code == 404
        assert client.get(f"/datasets/nope/{path}/big.jpg").status_code == 404
        assert client.get(f"/datasets/pets/{path}/manifest.json").status_code == 404
        assert client.get(f"/datasets/pets/{path}/.hidden.jpg").status_code == 422
        assert client.get(f"/datasets/pets/{path}/..%2Fpets.toml").status_code in (404, 422)
    assert client.delete("/datasets/pets/images/manifest.json").status_code == 404
    assert client.delete("/datasets/pets/images/big.txt").status_code == 404


def test_deleting_the_dataset_drops_its_thumbnails(client: TestClient, settings: Settings) -> None:
    _dataset(settings)
    client.get("/datasets/pets/thumbnails/big.jpg")
    assert client.delete("/datasets/pets").status_code == 200
    assert not (settings.data_root / "thumbnails" / "pets").exists()
