"""A control image's thumbnail over HTTP: the web page's previews of each target's references."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image

from fluxtrain.settings import Settings


def test_control_thumbnail_is_cached_apart_from_its_targets(client: TestClient, settings: Settings) -> None:
    folder = settings.datasets_dir / "pairs"
    (folder / "control").mkdir(parents=True)
    Image.new("RGB", (600, 300), (200, 30, 30)).save(folder / "cat.jpg")
    Image.new("RGB", (300, 600), (30, 30, 200)).save(folder / "control" / "cat.jpg")
    target = client.get("/datasets/pairs/thumbnails/cat.jpg")
    control = client.get("/datasets/pairs/control-thumbnails/cat.jpg")
    assert control.status_code == 200 and control.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(control.content)) as preview:
        assert preview.size == (128, 256) and preview.getpixel((64, 128))[2] > 150
    assert control.content != target.content
    assert client.get("/datasets/pairs/thumbnails/cat.jpg").content == target.content
    cached = settings.data_root / "thumbnails" / "pairs" / "control"
    assert [p.read_bytes() for p in cached.iterdir()] == [control.content]
    assert sorted(p.name for p in (folder / "control").iterdir()) == ["cat.jpg"]


def test_a_missing_control_is_a_404_naming_it(client: TestClient, settings: Settings) -> None:
    folder = settings.datasets_dir / "pairs"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "cat.jpg")
    response = client.get("/datasets/pairs/control-thumbnails/cat.jpg")
    assert response.status_code == 404 and "no control image named 'cat.jpg'" in response.text
    assert client.get("/datasets/absent/control-thumbnails/cat.jpg").status_code == 404
