"""FLUXTRAIN_MAX_IMAGE_PIXELS is the one bound on image size; Pillow's own guard does not get in the way."""

import asyncio
import io
import struct
import warnings
import zlib

import pytest
from PIL import Image

from fluxtrain.datasets.images import ImageRejectedError, open_image
from fluxtrain.datasets.ingest import add_uploads
from fluxtrain.settings import Settings
from tests.datasets.support import encode

WIDTH, HEIGHT = 12_000, 10_000


@pytest.fixture(scope="module")
def png_120mp() -> bytes:
    """A real 120 MP PNG, one bit per pixel and one colour, so it is small to hold and quick to make."""
    return encode(Image.new("1", (WIDTH, HEIGHT), 1), "PNG")


def settings_from_env(tmp_path, monkeypatch: pytest.MonkeyPatch, limit: str | None) -> Settings:
    if limit is None:
        monkeypatch.delenv("FLUXTRAIN_MAX_IMAGE_PIXELS", raising=False)
    else:
        monkeypatch.setenv("FLUXTRAIN_MAX_IMAGE_PIXELS", limit)
    return Settings(mount_path=tmp_path / "data", fs_path=tmp_path / "models", _env_file=None)


def upload(settings: Settings, data: bytes):
    return asyncio.run(add_uploads(settings=settings, name="big", uploads=[("big.png", io.BytesIO(data))]))


def test_a_120_mp_image_is_accepted_under_a_raised_limit_without_warnings(
    tmp_path, monkeypatch: pytest.MonkeyPatch, png_120mp: bytes
) -> None:
    settings = settings_from_env(tmp_path, monkeypatch, "200000000")
    assert settings.max_image_pixels == 200_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result = upload(settings, png_120mp)
    assert result.failed == {}
    with Image.open(result.files["big.png"]) as saved:
        assert saved.size == (WIDTH, HEIGHT)


def test_a_120_mp_image_is_refused_under_the_default_limit_without_warnings(
    tmp_path, monkeypatch: pytest.MonkeyPatch, png_120mp: bytes
) -> None:
    settings = settings_from_env(tmp_path, monkeypatch, None)
    assert settings.max_image_pixels == 100_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result = upload(settings, png_120mp)
    assert result.files == {}
    assert result.failed["big.png"] == (
        "decompression bomb: 12000x10000 is 120000000 pixels, the limit is 100000000"
    )


def png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims another size."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_limits_above_twice_pillows_default_are_possible() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open_image(io.BytesIO(png_claiming_size(20_000, 10_000)), max_pixels=250_000_000) as image:
            assert image.size == (20_000, 10_000)
        with pytest.raises(ImageRejectedError, match="the limit is 199999999"):
            open_image(io.BytesIO(png_claiming_size(20_000, 10_000)), max_pixels=199_999_999)
