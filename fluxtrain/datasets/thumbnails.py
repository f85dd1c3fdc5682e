"""Small JPEG previews of dataset images, made once and cached under `$DATA_ROOT/thumbnails/`.

The cache sits outside `datasets/` so a dataset folder keeps holding only images, captions and
the manifest; the previews of control images (edit pairs) sit in its own `control/` subfolder, as
the images do. A thumbnail's name carries the image's size and modification time, so a replaced
image never shows its old preview.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image

from fluxtrain.datasets.images import ImageRejectedError, open_image
from fluxtrain.datasets.store import control_dir, dataset_dir, list_images
from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.names import safe_join
from fluxtrain.settings import Settings

THUMBNAIL_SIDE = 256
THUMBNAIL_QUALITY = 80
THUMBNAILS_DIR = "thumbnails"


def thumbnails_dir(settings: Settings, name: str) -> Path:
    return safe_join(settings.data_root / THUMBNAILS_DIR, name, what="dataset name")


def dataset_image(settings: Settings, name: str, image: str) -> Path:
    """The path of one image of a dataset; 404 when the dataset has no such image."""
    folder = dataset_dir(settings, name)
    path = safe_join(folder, image, what="image name")
    if path not in list_images(folder):
        raise NotFoundError(f"dataset '{name}' has no image named '{image}'")
    return path


def _render(image: Path, max_pixels: int) -> bytes:
    """The preview; a file placed by hand that is no image, or too large, is a 422 naming it."""
    try:
        with open_image(image, max_pixels=max_pixels) as source:
            source.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
            preview = source.convert("RGB")
    except ImageRejectedError as exc:
        raise InvalidInputError(f"no thumbnail of {image.name}: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInputError(f"no thumbnail of {image.name}: it cannot be decoded as an image") from exc
    preview.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    preview.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def control_image(settings: Settings, name: str, image: str) -> Path:
    """The path of one control image of a dataset; 404 when its `control/` has no such image."""
    folder = control_dir(dataset_dir(settings, name))
    path = safe_join(folder, image, what="image name")
    if not folder.is_dir() or path not in list_images(folder):
        raise NotFoundError(f"dataset '{name}' has no control image named '{image}'")
    return path


def _cached_preview(path: Path, folder: Path, max_pixels: int) -> Path:
    """The preview of `path` in `folder`, made on first use; older previews of that stem dropped."""
    stat = path.stat()
    cached = folder / f"{path.stem}.{stat.st_size}-{stat.st_mtime_ns}.jpg"
    if not cached.is_file():
        preview = _render(path, max_pixels)
        _drop_stem(folder, path.stem)
        atomic_write_bytes(cached, preview)
    return cached


def thumbnail(*, settings: Settings, name: str, image: str) -> Path:
    """The cached preview of one image (at most THUMBNAIL_SIDE px a side), made on first use."""
    path = dataset_image(settings, name, image)
    return _cached_preview(path, thumbnails_dir(settings, name), settings.max_image_pixels)


def control_thumbnail(*, settings: Settings, name: str, image: str) -> Path:
    """The cached preview of one control image, as `thumbnail` makes a target's."""
    folder = control_dir(thumbnails_dir(settings, name))
    return _cached_preview(control_image(settings, name, image), folder, settings.max_image_pixels)


def drop_thumbnails(*, settings: Settings, name: str, image: str | None = None) -> None:
    """Forget the cached previews of one image, or of the whole dataset when `image` is None."""
    folder = thumbnails_dir(settings, name)
    if image is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    _drop_stem(folder, Path(image).stem)


def _drop_stem(folder: Path, stem: str) -> None:
    if folder.is_dir():
        for old in folder.glob(f"{stem}.*.jpg"):
            if old.name.removeprefix(f"{stem}.").count(".") == 1:
                old.unlink(missing_ok=True)
