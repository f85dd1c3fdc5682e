"""Captioning a dataset folder: every image gets `<stem>.txt` = "<trigger word>, <caption>" beside it.

Captions are written as each batch finishes, and existing ones are kept unless `overwrite` is set,
so an interrupted run resumes where it stopped and a repeated call costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fluxtrain.captioning.captioner import Florence2Captioner, GenerationOptions
from fluxtrain.captioning.florence import default_batch_size, get_caption_model
from fluxtrain.captioning.prompts import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_BEAMS,
    DEFAULT_PROMPT,
    CaptionTask,
    model_prompt,
    training_caption,
)
from fluxtrain.captioning.request import CaptionRequest
from fluxtrain.datasets.store import dataset_dir, list_images, read_caption, write_caption
from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.names import check_trigger_word, safe_join
from fluxtrain.settings import Settings

ProgressCallback = Callable[[int, int], None]


@dataclass
class CaptionResult:
    """Captions by image file name (kept and new ones), and images that failed with the reason."""

    captions: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def caption_dataset(
    *,
    settings: Settings,
    name: str,
    trigger_word: str,
    prompt: str = DEFAULT_PROMPT,
    overwrite: bool = False,
    task: CaptionTask | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    num_beams: int = DEFAULT_NUM_BEAMS,
    images: list[str] | None = None,
    on_progress: ProgressCallback | None = None,
) -> CaptionResult:
    """Caption a dataset so it can train; `on_progress(done, total)` counts the images still to caption.

    `images` limits the call to those file names, so a client can caption a set a few images at a
    time and show each caption as it is written.
    """
    folder = dataset_dir(settings, name)
    images_found = list_images(folder)
    if not images_found:
        raise InvalidInputError(f"dataset '{name}' has no images to caption")
    chosen = _chosen(folder, images_found, images, name)
    try:
        trigger_word = check_trigger_word(trigger_word)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    options = GenerationOptions(
        prompt=model_prompt(prompt, task), max_new_tokens=max_new_tokens, num_beams=num_beams
    )
    result = CaptionResult()
    kept, result.failed = ({}, {}) if overwrite else _existing_captions(chosen)
    pending = [image for image in chosen if image not in kept and image.name not in result.failed]
    written: dict[Path, str] = {}
    if on_progress is not None:
        on_progress(0, len(pending))
    if pending:
        loaded = get_caption_model(settings)
        captioner = Florence2Captioner(
            loaded,
            batch_size=default_batch_size(settings, loaded.device),
            max_image_pixels=settings.max_image_pixels,
        )
        done = 0
        for outcome in captioner.caption(pending, options):
            for image, caption in outcome.captions.items():
                line = training_caption(trigger_word, caption)
                write_caption(image, line)
                written[image] = line
            result.failed.update({image.name: reason for image, reason in outcome.failed.items()})
            done += len(outcome.captions) + len(outcome.failed)
            if on_progress is not None:
                on_progress(done, len(pending))
    for image in chosen:
        if image in kept or image in written:
            result.captions[image.name] = kept.get(image) or written[image]
    return result


def caption_request(
    *, settings: Settings, request: CaptionRequest, on_progress: ProgressCallback | None = None
) -> CaptionResult:
    """`caption_dataset` for a `/caption-images` body, the same call for the API and the CLI."""
    return caption_dataset(
        settings=settings,
        name=request.output_name,
        trigger_word=request.trigger_word,
        prompt=request.prompt,
        overwrite=request.overwrite,
        task=request.task,
        max_new_tokens=request.max_new_tokens,
        num_beams=request.num_beams,
        images=request.images,
        on_progress=on_progress,
    )


def _existing_captions(images: list[Path]) -> tuple[dict[Path, str], dict[str, str]]:
    """The non-blank captions to keep, and the images whose caption file cannot be read: those are
    left alone (it may be the user's own text in another encoding) until `overwrite` replaces it."""
    kept: dict[Path, str] = {}
    unreadable: dict[str, str] = {}
    for image in images:
        try:
            text = read_caption(image)
        except InvalidInputError as exc:
            unreadable[image.name] = f"{exc}; caption with overwrite to replace it"
            continue
        if text and text.strip():
            kept[image] = text
    return kept, unreadable


def _chosen(folder: Path, found: list[Path], names: list[str] | None, dataset: str) -> list[Path]:
    if names is None:
        return found
    chosen = []
    for image in dict.fromkeys(names):
        path = safe_join(folder, image, what="image name")
        if path not in found:
            raise NotFoundError(f"dataset '{dataset}' has no image named '{image}'")
        chosen.append(path)
    return chosen


def set_caption(*, settings: Settings, name: str, image: str, caption: str) -> Path:
    """Write one caption by hand, exactly as given, beside an image of the dataset."""
    folder = dataset_dir(settings, name)
    path = safe_join(folder, image, what="image name")
    if path not in list_images(folder):
        raise NotFoundError(f"dataset '{name}' has no image named '{image}'")
    write_caption(path, caption)
    return path
