"""What the dataset folders hold, as the API and the CLI list them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxtrain.datasets.pairs import pair_controls
from fluxtrain.datasets.store import (
    caption_path,
    dataset_dir,
    list_controls,
    list_dataset_names,
    list_images,
    read_caption,
    read_manifest,
)
from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.settings import Settings


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    images: int
    captions: int


@dataclass(frozen=True)
class ImageRecord:
    file: str
    path: str
    caption: str | None
    manifest: dict[str, Any] | None
    controls: list[str] = field(default_factory=list)
    caption_error: str | None = None


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    path: str
    images: list[ImageRecord]
    unpaired_controls: list[str] = field(default_factory=list)


def summarize_datasets(*, settings: Settings) -> list[DatasetSummary]:
    """Every dataset with its image and caption counts, sorted by name."""
    summaries = []
    for name in list_dataset_names(settings):
        try:
            images = list_images(dataset_dir(settings, name, must_exist=False))
        except FileNotFoundError:
            continue
        captions = sum(1 for image in images if caption_path(image).is_file())
        summaries.append(DatasetSummary(name=name, images=len(images), captions=captions))
    return summaries


def describe_dataset(*, settings: Settings, name: str) -> DatasetRecord:
    """One dataset's images, each with its caption, manifest entry and controls when it has them."""
    folder = dataset_dir(settings, name)
    try:
        manifest = read_manifest(folder)
        targets = list_images(folder)
        pairing = pair_controls((image.stem for image in targets), list_controls(folder))
        images = [
            ImageRecord(
                file=image.name,
                path=str(image),
                manifest=manifest.get(image.name),
                controls=[control.name for control in pairing.controls.get(image.stem, [])],
                **_caption_fields(image),
            )
            for image in targets
        ]
    except FileNotFoundError as exc:
        raise NotFoundError(f"dataset '{name}' does not exist") from exc
    unpaired = [control.name for control in pairing.unpaired]
    return DatasetRecord(name=name, path=str(folder), images=images, unpaired_controls=unpaired)


def _caption_fields(image: Path) -> dict[str, str | None]:
    """The caption, or why its file cannot be read: one such file must not hide the whole dataset."""
    try:
        return {"caption": read_caption(image)}
    except InvalidInputError as exc:
        return {"caption": None, "caption_error": str(exc)}
