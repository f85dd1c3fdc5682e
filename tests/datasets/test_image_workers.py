"""Image work in worker processes: the same bytes as in this process, and a crash fails one URL only."""

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.datasets import ingest
from fluxtrain.datasets.images import normalize_image
from fluxtrain.datasets.ingest import DownloadResult, download_images
from fluxtrain.settings import Settings
from tests.datasets import support
from tests.datasets.support import LoopbackServer, Reply


def run(settings: Settings, urls: list[str]) -> DownloadResult:
    return asyncio.run(download_images(settings=settings, name="set", urls=urls))


def _reencoded_inputs() -> dict[str, bytes]:
    gradient = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    rotated = Image.new("RGB", (40, 30), (10, 120, 240))
    exif = rotated.getexif()
    exif[0x0112] = 6
    return {
        "/gradient.png": support.encode(gradient, "PNG"),
        "/alpha.png": support.encode(Image.new("RGBA", (32, 32), (0, 200, 0, 90)), "PNG"),
        "/rotated.jpg": support.encode(rotated, "JPEG", exif=exif.tobytes()),
        "/cmyk.jpg": support.encode(Image.new("CMYK", (24, 24), (0, 80, 160, 20)), "JPEG"),
    }


def test_worker_processes_write_the_bytes_this_process_would(
    server: LoopbackServer, open_settings: Settings
) -> None:
    inputs = _reencoded_inputs()
    urls = {path: server.add(path, Reply(body=body)) for path, body in inputs.items()}
    result = run(open_settings.model_copy(update={"image_workers": 2}), list(urls.values()))
    assert result.failed == {}
    for path, url in urls.items():
        expected = normalize_image(inputs[path], max_pixels=open_settings.max_image_pixels)
        assert expected.stored == "reencoded"
        assert Path(result.files[url]).read_bytes() == expected.jpeg


def test_a_worker_that_dies_fails_that_url_only_and_the_pool_recovers(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "prepare_into", support.prepare_or_die)
    settings = open_settings.model_copy(update={"image_workers": 2})
    hostile = server.add("/hostile.png", Reply(body=png_bytes + support.CRASH_MARKER))
    fine = [server.add(f"/{index}.png", Reply(body=png_bytes)) for index in range(8)]
    result = run(settings, [*fine[:4], hostile, *fine[4:]])
    assert result.failed == {hostile: "refused: decoding the image crashed its worker process"}
    assert sorted(result.files) == sorted(fine)
    later = server.add("/later.png", Reply(body=png_bytes))
    assert list(run(settings, [later]).files) == [later]
