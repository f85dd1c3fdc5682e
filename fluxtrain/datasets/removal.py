"""Removing one image from a dataset: the image, its caption and its manifest entry together."""

from __future__ import annotations

from fluxtrain.datasets.locks import dataset_lock
from fluxtrain.datasets.store import (
    MANIFEST_NAME,
    caption_path,
    dataset_dir,
    list_images,
    read_manifest,
    write_manifest,
)
from fluxtrain.errors import NotFoundError
from fluxtrain.names import safe_join
from fluxtrain.settings import Settings


def delete_image(*, settings: Settings, name: str, image: str) -> None:
    """Remove the image with its caption; the manifest is rewritten under the dataset's lock.

    `read_manifest` keeps only entries of images still present, so rewriting it after the unlink
    drops this image's entry and no other writer's.
    """
    folder = dataset_dir(settings, name)
    path = safe_join(folder, image, what="image name")
    with dataset_lock(folder):
        if path not in list_images(folder):
            raise NotFoundError(f"dataset '{name}' has no image named '{image}'")
        path.unlink()
        caption_path(path).unlink(missing_ok=True)
        if (folder / MANIFEST_NAME).is_file():
            write_manifest(folder, read_manifest(folder))
