"""Aspect-ratio buckets as kohya's sd-scripts makes them."""

from __future__ import annotations

from PIL import Image

from fluxtrain.training.buckets import BucketSpec, bucket_resolutions, choose_bucket, fit_to_bucket

SPEC = BucketSpec(resolution=(512, 512), enable=True, min_reso=256, max_reso=1024, steps=64)


def test_buckets_keep_the_area_and_the_step() -> None:
    sizes = bucket_resolutions(SPEC)
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert all(256 <= side <= 1024 for size in sizes for side in size)


def test_image_goes_to_the_closest_aspect_ratio() -> None:
    assert choose_bucket(SPEC, 1600, 900) == (640, 384)
    assert choose_bucket(SPEC, 900, 1600) == (384, 640)
    assert choose_bucket(SPEC, 700, 700) == (512, 512)
    assert choose_bucket(BucketSpec(resolution=(512, 512)), 1600, 900) == (512, 512)


def test_no_upscale_keeps_small_images_small() -> None:
    spec = BucketSpec(resolution=(512, 512), enable=True, steps=64, no_upscale=True)
    assert choose_bucket(spec, 300, 200) == (256, 192)
    width, height = choose_bucket(spec, 2000, 1000)
    assert width * height <= 512 * 512 and width % 64 == 0 and height % 64 == 0
    assert abs(width / height - 2.0) < 0.3


def test_fit_covers_then_crops_the_centre() -> None:
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (140, 0, 160, 100))
    fitted = fit_to_bucket(image, (64, 64))
    assert fitted.size == (64, 64)
    assert fitted.getpixel((32, 32))[2] > 200 and fitted.getpixel((2, 32))[0] > 200
