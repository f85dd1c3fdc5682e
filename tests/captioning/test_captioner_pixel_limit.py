"""The captioner bounds images by FLUXTRAIN_MAX_IMAGE_PIXELS from the header; Pillow's guard stays out."""

from __future__ import annotations

import warnings

from PIL import Image

from fluxtrain.captioning.service import caption_dataset
from fluxtrain.settings import Settings


def test_an_image_over_the_limit_fails_from_its_header_without_warnings(
    caption_settings: Settings, make_dataset
) -> None:
    folder = make_dataset(count=1)
    Image.new("1", (12_000, 10_000), 1).save(folder / "huge.png")
    assert caption_settings.max_image_pixels == 100_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result = caption_dataset(
            settings=caption_settings, name="cats", trigger_word="mycat", max_new_tokens=6, num_beams=1
        )
    assert list(result.captions) == ["img0.jpg"]
    assert result.failed == {
        "huge.png": "decompression bomb: 12000x10000 is 120000000 pixels, the limit is 100000000"
    }
    assert not (folder / "huge.txt").exists()
