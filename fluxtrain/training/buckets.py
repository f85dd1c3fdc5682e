"""Aspect-ratio bucketing as kohya's sd-scripts does it.

Every bucket has about the area of `resolution` squared, sides between `min_reso` and
`max_reso` in multiples of `steps`; an image goes to the bucket whose aspect ratio is closest
to its own, is scaled to cover it and centre-cropped. With `no_upscale` a small image gets a
bucket of its own size (rounded down to `steps`) instead of being enlarged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from fluxtrain.dataset_config.schema import DatasetSpec

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketSpec:
    resolution: Size
    enable: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    steps: int = 64
    no_upscale: bool = False

    @classmethod
    def of(cls, dataset: DatasetSpec, *, enable: bool | None = None) -> BucketSpec:
        """The bucketing a TOML's dataset section asks for (`enable` overrides its enable_bucket)."""
        return cls(
            resolution=dataset.resolution,
            enable=dataset.enable_bucket if enable is None else enable,
            min_reso=dataset.min_bucket_reso,
            max_reso=dataset.max_bucket_reso,
            steps=dataset.bucket_reso_steps,
            no_upscale=dataset.bucket_no_upscale,
        )

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


def bucket_resolutions(spec: BucketSpec) -> list[Size]:
    """The (width, height) buckets for this spec, both orientations, sorted."""
    step = spec.steps
    side = int(math.sqrt(spec.max_area) // step) * step
    sizes: set[Size] = {(side, side)}
    width = spec.min_reso
    while width <= spec.max_reso:
        height = min(spec.max_reso, int((spec.max_area // width) // step) * step)
        if height >= spec.min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    return sorted(sizes)


def _no_upscale_bucket(spec: BucketSpec, width: int, height: int) -> Size:
    step = spec.steps
    if width * height > spec.max_area:
        ratio = width / height
        scaled_w = math.sqrt(spec.max_area * ratio)
        scaled_h = spec.max_area / scaled_w
        by_width = int(scaled_w // step) * step
        by_height = int(scaled_h // step) * step
        candidates = [(by_width, int(by_width / ratio)), (int(by_height * ratio), by_height)]
        width, height = min(candidates, key=lambda size: abs(size[0] / max(size[1], 1) - ratio))
    return max(step, width - width % step), max(step, height - height % step)


def choose_bucket(spec: BucketSpec, width: int, height: int) -> Size:
    """The training size (width, height) for an image of this size."""
    if not spec.enable:
        return spec.resolution
    if spec.no_upscale:
        return _no_upscale_bucket(spec, width, height)
    ratio = width / height
    return min(bucket_resolutions(spec), key=lambda size: abs(size[0] / size[1] - ratio))


def fit_to_bucket(image: Image.Image, size: Size) -> Image.Image:
    """Scale the image to cover `size` keeping its aspect ratio, then crop the centre."""
    target_w, target_h = size
    scale = max(target_w / image.width, target_h / image.height)
    scaled = (max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale)))
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.LANCZOS)
    left = (image.width - target_w) // 2
    top = (image.height - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))
