"""Dataset folders on disk: `$DATA_ROOT/datasets/<name>/` with images, captions and a manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from fluxtrain.datasets.locks import dataset_lock
from fluxtrain.datasets.pairs import CONTROL_DIR
from fluxtrain.errors import ConflictError, InvalidInputError, NotFoundError
from fluxtrain.fsutil import atomic_write_text
from fluxtrain.names import safe_join
from fluxtrain.settings import Settings

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
CAPTION_SUFFIX = ".txt"
CONFIG_SUFFIX = ".toml"
# What kohya's sd-scripts read as images, hence the trainer, the lint and the listings: one set, so
# a file shown in a dataset is one that trains (every stored image is a .jpg).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def dataset_dir(settings: Settings, name: str, *, must_exist: bool = True) -> Path:
    """The folder of dataset `name`; 404 when it must exist and does not.

    A dataset's config is the file `<name>.toml` beside its folder, so no dataset may itself be
    called `*.toml`: folder and file would collide.
    """
    root = settings.datasets_dir
    root.mkdir(parents=True, exist_ok=True)
    folder = safe_join(root, name, what="dataset name")
    if folder.suffix.lower() == CONFIG_SUFFIX:
        raise InvalidInputError(f"dataset name must not end in '{CONFIG_SUFFIX}' (that is its config file)")
    if must_exist and not folder.is_dir():
        raise NotFoundError(f"dataset '{name}' does not exist")
    return folder


def list_dataset_names(settings: Settings) -> list[str]:
    """The datasets a request can name: a folder put in by hand under a name `dataset_dir` refuses
    (a space, `*.toml`, a link out of the folder) is left out rather than failing the listing."""
    root = settings.datasets_dir
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _nameable(settings, p.name))


def _nameable(settings: Settings, name: str) -> bool:
    try:
        dataset_dir(settings, name, must_exist=False)
    except InvalidInputError:
        return False
    return True


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_images(folder: Path) -> list[Path]:
    """Image files of a dataset folder (or any subset's folder), sorted by name; hidden and
    temporary files, and folders whatever their name, skipped."""
    return sorted(p for p in folder.iterdir() if _is_image_name(p.name) and p.is_file())


def image_names(folder: Path) -> set[str]:
    """The names `list_images` would list, from one directory scan (no Path per file, no sort)."""
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries if _is_image_name(entry.name) and _is_file(entry)}


def _is_file(entry: os.DirEntry[str]) -> bool:
    """`Path.is_file`'s answer for a scanned entry: a symbolic link that loops is no file, not an error."""
    try:
        return entry.is_file()
    except OSError:
        return False


def control_dir(folder: Path) -> Path:
    """Where a dataset keeps its control (reference) images: `<folder>/control/`."""
    return folder / CONTROL_DIR


def list_controls(folder: Path) -> list[Path]:
    """The control images of a dataset folder; none when it has no `control/`."""
    controls = control_dir(folder)
    return list_images(controls) if controls.is_dir() else []


def caption_path(image: Path, extension: str = CAPTION_SUFFIX) -> Path:
    return image.with_suffix(extension)


def read_caption(image: Path) -> str | None:
    """The caption file's text exactly as stored (a hand-written caption is shown as it was sent).

    A caption another tool wrote in another encoding is an InvalidInputError naming it: guessing
    the encoding would show, and on the next save store, text the user never wrote."""
    path = caption_path(image)
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"caption {path.name} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at {exc.start})"
        ) from exc


def write_caption(image: Path, caption: str) -> None:
    atomic_write_text(caption_path(image), caption)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest's entries for images still in the folder; a missing or broken manifest is empty."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        present = image_names(folder)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: entry for name, entry in data.items() if name in present and isinstance(entry, dict)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """One image per line, sorted: readable and diffable, and written by json's C encoder (an
    indented dump runs its pure-Python one, 90 ms for a 1,000-image manifest)."""
    lines = ",\n".join(
        f"  {json.dumps(name)}: {json.dumps(manifest[name], sort_keys=True)}" for name in sorted(manifest)
    )
    atomic_write_text(folder / MANIFEST_NAME, "{\n" + lines + "\n}\n" if lines else "{}\n")


def delete_dataset(settings: Settings, name: str) -> None:
    """Remove a dataset at once, even mid-batch: renamed away under its lock, then deleted.

    Its config `<name>.toml` goes too: it would point a later /train at a folder that is gone.
    """
    folder = dataset_dir(settings, name)
    config = folder.with_name(folder.name + CONFIG_SUFFIX)
    with dataset_lock(folder):
        if not folder.is_dir():
            raise NotFoundError(f"dataset '{name}' does not exist")
        if config.is_dir():
            raise ConflictError(f"{config.name} is a folder, not the dataset's config: move it away first")
        doomed = folder.with_name(f".deleting-{folder.name}-{uuid.uuid4().hex}")
        folder.rename(doomed)
        config.unlink(missing_ok=True)
    shutil.rmtree(doomed, ignore_errors=True)
    if doomed.exists():
        logger.warning("could not remove all of %s; it is hidden from listings", doomed)
