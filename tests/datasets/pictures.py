"""Distinct pictures for the lint tests: a random 6x6 colour grid blown up smoothly, so each seed
gives a photo-like image whose perceptual hash is far from every other seed's.

Imported as `from tests.datasets.pictures import ...` (pytest's importlib mode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC)


def add_image(folder: Path, name: str, image: Image.Image, caption: str | None = None) -> Path:
    """Save `image` as `name` (its suffix picks the format) with `caption` beside it as `.txt`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.suffix == ".jpg":
        image.save(path, quality=90)
    else:
        image.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path
