"""Batched Florence-2 captioning: the next batch is decoded and preprocessed while this one generates."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature

from fluxtrain.captioning.florence import CaptionModel
from fluxtrain.captioning.prompts import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_BEAMS,
    DEFAULT_TASK,
    clean_caption,
)
from fluxtrain.datasets.images import ImageRejectedError, open_image

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, ImageRejectedError)


@dataclass(frozen=True)
class GenerationOptions:
    """`prompt` is what the model reads: a Florence-2 task token or free text (see prompts.model_prompt)."""

    prompt: str = DEFAULT_TASK
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    num_beams: int = DEFAULT_NUM_BEAMS


@dataclass
class BatchOutcome:
    captions: dict[Path, str] = field(default_factory=dict)
    failed: dict[Path, str] = field(default_factory=dict)


@dataclass
class _PreparedBatch:
    images: list[Path]
    inputs: BatchFeature | None
    failed: dict[Path, str]


def open_rgb(path: Path, *, max_pixels: int) -> Image.Image:
    """Decode fully (so corrupt files fail here, not in the model), upright, as RGB.

    The pixel count is checked against `max_pixels` from the header first; Pillow's own limit is
    lifted (see fluxtrain.datasets.images), so this is the bound.
    """
    with open_image(path, max_pixels=max_pixels) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _decode_failure(path: Path, exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown format or corrupt file)"
    if isinstance(exc, ImageRejectedError):
        return str(exc)
    return f"cannot read image: {exc}".replace(str(path), path.name)


class Florence2Captioner:
    """Captions image files with one loaded Florence-2, `batch_size` images per `generate` call."""

    def __init__(self, loaded: CaptionModel, *, batch_size: int, max_image_pixels: int) -> None:
        self._loaded = loaded
        self._batch_size = batch_size
        self._max_image_pixels = max_image_pixels

    def caption(self, images: Sequence[Path], options: GenerationOptions) -> Iterator[BatchOutcome]:
        """One outcome per batch, in order; a prefetch thread prepares batch i+1 during batch i."""
        batches = [list(images[i : i + self._batch_size]) for i in range(0, len(images), self._batch_size)]
        if not batches:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-prefetch") as pool:
            upcoming: Future[_PreparedBatch] = pool.submit(self._prepare, batches[0], options.prompt)
            for index in range(len(batches)):
                prepared = upcoming.result()
                if index + 1 < len(batches):
                    upcoming = pool.submit(self._prepare, batches[index + 1], options.prompt)
                yield self._generate(prepared, options)

    def _prepare(self, paths: list[Path], prompt: str) -> _PreparedBatch:
        decoded: list[Image.Image] = []
        readable: list[Path] = []
        failed: dict[Path, str] = {}
        for path in paths:
            try:
                decoded.append(open_rgb(path, max_pixels=self._max_image_pixels))
                readable.append(path)
            except _DECODE_ERRORS as exc:
                failed[path] = _decode_failure(path, exc)
        if not decoded:
            return _PreparedBatch(images=[], inputs=None, failed=failed)
        try:
            inputs = self._loaded.processor(
                images=decoded, text=[prompt] * len(decoded), return_tensors="pt", padding=True
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            failed.update({path: f"cannot preprocess image: {exc}" for path in readable})
            return _PreparedBatch(images=[], inputs=None, failed=failed)
        if self._loaded.device.type == "cuda":
            inputs["pixel_values"] = inputs["pixel_values"].pin_memory()
        return _PreparedBatch(images=readable, inputs=inputs, failed=failed)

    def _generate(self, prepared: _PreparedBatch, options: GenerationOptions) -> BatchOutcome:
        outcome = BatchOutcome(failed=dict(prepared.failed))
        if prepared.inputs is None:
            return outcome
        try:
            texts = self._generate_texts(prepared.inputs, options)
        except RuntimeError as exc:
            outcome.failed.update({path: f"caption generation failed: {exc}" for path in prepared.images})
            return outcome
        for path, text in zip(prepared.images, texts, strict=True):
            caption = clean_caption(text)
            if caption:
                outcome.captions[path] = caption
            else:
                outcome.failed[path] = "the model returned an empty caption"
        return outcome

    def _generate_texts(self, inputs: BatchFeature, options: GenerationOptions) -> list[str]:
        """Generate and decode; on a CUDA out-of-memory error, retry the batch in two halves."""
        loaded = self._loaded
        try:
            with loaded.lock, torch.inference_mode():
                generated = loaded.model.generate(
                    input_ids=inputs["input_ids"].to(loaded.device),
                    attention_mask=inputs["attention_mask"].to(loaded.device),
                    pixel_values=inputs["pixel_values"].to(loaded.device, loaded.dtype, non_blocking=True),
                    max_new_tokens=options.max_new_tokens,
                    num_beams=options.num_beams,
                    do_sample=False,
                )
        except torch.OutOfMemoryError:
            count = inputs["input_ids"].shape[0]
            if count == 1:
                raise
            torch.cuda.empty_cache()
            half = count // 2
            first = BatchFeature({key: value[:half] for key, value in inputs.items()})
            second = BatchFeature({key: value[half:] for key, value in inputs.items()})
            return self._generate_texts(first, options) + self._generate_texts(second, options)
        return loaded.processor.batch_decode(generated, skip_special_tokens=True)
