"""Dataset lint: what is wrong with a dataset's images and captions before anything is cached.

Pure checks over the subsets a dataset TOML resolves to (or a dataset folder at
/create-dataset-config's defaults): each image file is read once, for its sha256, its size (from
the header, EXIF rotation applied) and a perceptual hash of a reduced decode (a JPEG is decoded at
1/8 scale with Pillow's draft mode), so a 1,000-image dataset lints in seconds. T5 tokens are
counted by a tokenizer the caller hands in; without one that is a finding, not a guess by
characters. An `error` is a dataset the trainer would refuse; a `warning` trains but badly.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, computed_field

from fluxtrain.dataset_config.schema import DatasetConfigFile
from fluxtrain.datasets.store import list_images
from fluxtrain.training.buckets import BucketSpec, Size, bucket_resolutions, choose_bucket
from fluxtrain.training.config import DEFAULT_MAX_TRAIN_STEPS
from fluxtrain.training.data import IMAGE_ERRORS, _caption_extensions

Severity = Literal["error", "warning"]
FindingKind = Literal[
    "image_dir_missing",
    "no_images",
    "unreadable_image",
    "unreadable_caption",
    "too_small",
    "upscaled",
    "aspect_ratio",
    "exact_duplicate",
    "near_duplicate",
    "caption_missing",
    "caption_empty",
    "trigger_word_missing",
    "caption_too_long",
    "tokenizer_missing",
    "too_few_images",
    "too_many_steps",
    "control_dir_missing",
    "control_missing",
    "control_unpaired",
    "control_aspect",
    "too_many_references",
    "control_flip_aug",
]

# 64-bit DCT perceptual hashes (imagehash.phash): a resized or re-encoded copy differed from its
# original in 0-2 bits, distinct pictures in 16 or more (mean 31, over 1,770 pairs); for unrelated
# images the distance is about binomial(64, 1/2), so 6 or fewer happens once in 10^11 pairs. A crop
# is not a near duplicate (10-18 bits). Flat images all hash alike and are reported together.
NEAR_DUPLICATE_BITS = 6
# Fewer images than this: a LoRA learns the pictures rather than the subject or style.
MIN_IMAGES = 5
# FLUX LoRA recipes (kohya, ai-toolkit) show each image about 100 times (20 images, 2,000 steps at
# batch 1); four times that and the LoRA reproduces its training images.
MAX_VIEWS_PER_IMAGE = 400
# Files a finding's message names before it says "and N more"; `files` lists them all.
EXAMPLES = 3
_WORKERS = min(8, os.cpu_count() or 1)

TokenCounter = Callable[[list[str]], list[int]]


class LintFinding(BaseModel):
    """One problem, with every file it concerns (relative to the dataset folder)."""

    kind: FindingKind
    severity: Severity
    files: list[str] = Field(default_factory=list)
    message: str


class LintReport(BaseModel):
    """Everything lint found in one dataset; `errors` > 0 means it cannot be trained."""

    dataset: str
    config: str | None = Field(None, description="The dataset TOML whose settings were used, if any.")
    images: int = Field(description="Image files the trainer would read.")
    token_limit: int | None = Field(None, description="T5 tokens a caption may have before it is cut.")
    findings: list[LintFinding]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def errors(self) -> int:
        return sum(1 for finding in self.findings if finding.severity == "error")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def warnings(self) -> int:
        return sum(1 for finding in self.findings if finding.severity == "warning")

    def warning_findings(self) -> list[LintFinding]:
        return [finding for finding in self.findings if finding.severity == "warning"]

    def error_message(self) -> str:
        """The errors as one sentence, for a 422."""
        return "; ".join(f"{f.kind}: {f.message}" for f in self.findings if f.severity == "error")


@dataclass(frozen=True)
class LintSubset:
    """One folder of images as the trainer reads it, with the bucket settings of its dataset."""

    where: str
    image_dir: Path
    prefix: str
    caption_extensions: tuple[str, ...]
    class_tokens: str | None
    num_repeats: int
    batch_size: int
    buckets: BucketSpec


@dataclass(frozen=True)
class LintOptions:
    """The run being planned: its trigger word, its length, and how captions are tokenized."""

    trigger_word: str | None = None
    max_train_steps: int | None = None
    max_train_epochs: int | None = None
    gpus: int = 1
    token_limit: int | None = None
    count_tokens: TokenCounter | None = None
    tokenizer_problem: str | None = None


@dataclass(frozen=True)
class _Image:
    shown: str
    subset: LintSubset
    sha256: str
    size: Size
    phash: int
    caption_files: int
    caption: str | None


def subsets_of(
    config: DatasetConfigFile, *, dataset_folder: Path, enable_bucket: bool | None = None
) -> list[LintSubset]:
    """The resolved TOML's subsets; files are named relative to `dataset_folder` when inside it."""
    subsets = []
    for d_index, dataset in enumerate(config.datasets):
        spec = BucketSpec.of(dataset, enable=enable_bucket)
        for s_index, subset in enumerate(dataset.subsets):
            subsets.append(
                LintSubset(
                    where=f"datasets[{d_index}].subsets[{s_index}]",
                    image_dir=subset.image_dir,
                    prefix=_prefix(subset.image_dir, dataset_folder.resolve()),
                    caption_extensions=_caption_extensions(subset.caption_extension),
                    class_tokens=subset.class_tokens,
                    num_repeats=subset.num_repeats,
                    batch_size=dataset.batch_size,
                    buckets=spec,
                )
            )
    return subsets


def _prefix(image_dir: Path, dataset_folder: Path) -> str:
    if image_dir == dataset_folder:
        return ""
    for base in (dataset_folder, dataset_folder.parent):
        if image_dir.is_relative_to(base):
            return f"{image_dir.relative_to(base).as_posix()}/"
    return f"{image_dir.as_posix()}/"


def _oriented_size(image: Image.Image) -> Size:
    """The size after EXIF rotation (as the trainer's exif_transpose sees it), from the header alone."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112) in (5, 6, 7, 8) else (width, height)


def _perceptual_hash(image: Image.Image) -> int:
    import imagehash

    image.draft("L", (64, 64))
    bits = imagehash.phash(image).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _read_caption(path: Path, extensions: tuple[str, ...]) -> tuple[int, str | None]:
    """How many caption files the image has and the first non-blank one (the trainer's choice)."""
    found = 0
    for suffix in extensions:
        caption = path.with_suffix(suffix)
        if caption.is_file():
            found += 1
            text = caption.read_text(encoding="utf-8").strip()
            if text:
                return found, text
    return found, None


@dataclass(frozen=True)
class _Unreadable:
    kind: Literal["unreadable_image", "unreadable_caption"]
    shown: str
    why: str


def _unreadable_findings(unreadable: list[_Unreadable]) -> list[LintFinding]:
    """One error per kind, naming each file with its reason (the first few in the message)."""
    findings = []
    for kind, what in (("unreadable_image", "image(s)"), ("unreadable_caption", "caption(s)")):
        group = [item for item in unreadable if item.kind == kind]
        if group:
            reasons = [f"{item.shown} ({item.why})" for item in group]
            findings.append(
                LintFinding(
                    kind=kind,
                    severity="error",
                    files=[item.shown for item in group],
                    message=f"{len(group)} {what} cannot be read: {_listed(reasons)}",
                )
            )
    return findings


def _inspect(subset: LintSubset, path: Path) -> _Image | _Unreadable:
    shown = subset.prefix + path.name
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            size = _oriented_size(image)
            phash = _perceptual_hash(image)
    except UnidentifiedImageError:
        return _Unreadable("unreadable_image", shown, "not an image Pillow can read")
    except IMAGE_ERRORS as exc:
        return _Unreadable("unreadable_image", shown, str(exc))
    try:
        caption_files, caption = _read_caption(path, subset.caption_extensions)
    except (OSError, UnicodeDecodeError) as exc:
        return _Unreadable("unreadable_caption", shown, f"not UTF-8 text: {exc}")
    return _Image(
        shown=shown,
        subset=subset,
        sha256=hashlib.sha256(data).hexdigest(),
        size=size,
        phash=phash,
        caption_files=caption_files,
        caption=caption,
    )


def _listed(files: Sequence[str]) -> str:
    named = ", ".join(files[:EXAMPLES])
    return named + (f" and {len(files) - EXAMPLES} more" if len(files) > EXAMPLES else "")


def _warning(kind: FindingKind, files: list[str], message: str) -> LintFinding:
    return LintFinding(kind=kind, severity="warning", files=files, message=message)


def _size_findings(images: list[_Image]) -> list[LintFinding]:
    too_small: list[tuple[str, str]] = []
    upscaled: list[tuple[float, str, str]] = []
    extreme: list[tuple[float, str, str]] = []
    for image in images:
        spec = image.subset.buckets
        width, height = image.size
        smallest_side, ratios = _bucket_facts(spec)
        bucket = choose_bucket(spec, width, height)
        scale = max(bucket[0] / width, bucket[1] / height)
        detail = f"{image.shown} {width}x{height} -> {bucket[0]}x{bucket[1]}"
        if min(width, height) < smallest_side:
            too_small.append((image.shown, f"{detail} (smallest bucket side {smallest_side})"))
        elif scale > 1:
            upscaled.append((scale, image.shown, f"{detail} ({scale:.2f}x)"))
        ratio = width / height
        if not ratios[0] <= ratio <= ratios[1]:
            kept = min(ratio, bucket[0] / bucket[1]) / max(ratio, bucket[0] / bucket[1])
            extreme.append((kept, image.shown, f"{detail} ({_ratio(ratio)}, {100 * (1 - kept):.0f}% cut)"))
    findings = []
    if too_small:
        files = [shown for shown, _ in too_small]
        findings.append(
            _warning(
                "too_small",
                files,
                f"{len(files)} image(s) are smaller than the smallest bucket and are enlarged to train, "
                f"so the LoRA learns their blur: {_listed([text for _, text in too_small])}",
            )
        )
    if upscaled:
        upscaled.sort(reverse=True)
        findings.append(
            _warning(
                "upscaled",
                [shown for _, shown, _ in upscaled],
                f"{len(upscaled)} image(s) are enlarged to fill their bucket: "
                f"{_listed([text for _, _, text in upscaled])}",
            )
        )
    if extreme:
        extreme.sort()
        findings.append(
            _warning(
                "aspect_ratio",
                [shown for _, shown, _ in extreme],
                f"{len(extreme)} image(s) have an aspect ratio beyond the buckets' range and lose part of "
                f"the picture to the crop: {_listed([text for _, _, text in extreme])}",
            )
        )
    return findings


@lru_cache(maxsize=64)
def _bucket_facts(spec: BucketSpec) -> tuple[int, tuple[float, float]]:
    """The smallest side an image may train at, and the aspect-ratio range bucketing covers (also
    judged without bucketing, where every image is cropped to the resolution)."""
    grid = bucket_resolutions(replace(spec, enable=True))
    sides = grid if spec.enable else [spec.resolution]
    ratios = [width / height for width, height in grid]
    return min(min(size) for size in sides), (min(ratios), max(ratios))


def _ratio(ratio: float) -> str:
    return f"{ratio:.2f}:1" if ratio >= 1 else f"1:{1 / ratio:.2f}"


def _duplicate_findings(images: list[_Image]) -> list[LintFinding]:
    by_hash: dict[str, list[_Image]] = {}
    for image in images:
        by_hash.setdefault(image.sha256, []).append(image)
    findings = [
        _warning(
            "exact_duplicate",
            [image.shown for image in group],
            f"{_listed([image.shown for image in group])} are the same file (sha256 {digest[:12]}…): "
            "each copy trains that picture once more",
        )
        for digest, group in by_hash.items()
        if len(group) > 1
    ]
    unique = [group[0] for group in by_hash.values()]
    for group in _near_groups([image.phash for image in unique]):
        files = [unique[index].shown for index in group]
        findings.append(
            _warning(
                "near_duplicate",
                files,
                f"{_listed(files)} look alike (perceptual hashes within {NEAR_DUPLICATE_BITS} of 64 bits): "
                "a resized or re-encoded copy trains that picture more than the rest",
            )
        )
    return findings


def _near_groups(hashes: list[int]) -> list[list[int]]:
    """Indices whose hashes lie within NEAR_DUPLICATE_BITS of each other, joined transitively."""
    values = np.array(hashes, dtype=np.uint64)
    parent = list(range(len(hashes)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for index in range(len(hashes) - 1):
        close = np.nonzero(np.bitwise_count(values[index + 1 :] ^ values[index]) <= NEAR_DUPLICATE_BITS)[0]
        for other in close + index + 1:
            parent[root(int(other))] = root(index)
    groups: dict[int, list[int]] = {}
    for index in range(len(hashes)):
        groups.setdefault(root(index), []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def _caption_findings(images: list[_Image], options: LintOptions) -> list[LintFinding]:
    findings = []
    missing = [image for image in images if image.caption_files == 0]
    empty = [image for image in images if image.caption_files and image.caption is None]
    for kind, group, what in (
        ("caption_missing", missing, "no caption file"),
        ("caption_empty", empty, "an empty caption"),
    ):
        if group:
            fallback = {image.subset.class_tokens for image in group}
            trains_on = (
                f"they train on the class tokens {', '.join(repr(t) for t in sorted(fallback))}"
                if None not in fallback
                else "they train on an empty caption (or their subset's class tokens)"
            )
            files = [image.shown for image in group]
            findings.append(
                _warning(kind, files, f"{len(files)} image(s) have {what} ({_listed(files)}); {trains_on}")
            )
    captioned = [image for image in images if image.caption is not None]
    lacking = [
        image.shown
        for image in captioned
        if (word := options.trigger_word or image.subset.class_tokens) and not _mentions(image.caption, word)
    ]
    if lacking:
        word = options.trigger_word or "their subset's class tokens"
        findings.append(
            _warning(
                "trigger_word_missing",
                lacking,
                f"{len(lacking)} caption(s) do not contain the trigger word {word!r}: {_listed(lacking)}",
            )
        )
    findings.extend(_length_findings(captioned, options))
    return findings


def _mentions(caption: str | None, word: str) -> bool:
    return caption is not None and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", caption) is not None


def _length_findings(captioned: list[_Image], options: LintOptions) -> list[LintFinding]:
    if not captioned:
        return []
    if options.count_tokens is None or options.token_limit is None:
        return [
            _warning(
                "tokenizer_missing",
                [],
                f"caption lengths were not checked: {options.tokenizer_problem or 'no T5 tokenizer'}",
            )
        ]
    counts = options.count_tokens([image.caption or "" for image in captioned])
    long = sorted(
        (
            (count, image.shown)
            for count, image in zip(counts, captioned, strict=True)
            if count > options.token_limit
        ),
        reverse=True,
    )
    if not long:
        return []
    shown = [f"{name} ({count} tokens)" for count, name in long]
    return [
        _warning(
            "caption_too_long",
            [name for _, name in long],
            f"{len(long)} caption(s) are longer than the {options.token_limit} T5 tokens the text encoder "
            f"keeps; the rest is cut off: {_listed(shown)}",
        )
    ]


def _size_of_run_findings(images: list[_Image], options: LintOptions) -> list[LintFinding]:
    findings = []
    count = len(images)
    if count < MIN_IMAGES:
        findings.append(
            _warning(
                "too_few_images",
                [],
                f"{count} image(s): with fewer than {MIN_IMAGES} a LoRA learns these pictures rather than "
                "their subject or style",
            )
        )
    batches = 0
    views = 0
    for subset in {image.subset for image in images}:
        samples = sum(1 for image in images if image.subset == subset) * subset.num_repeats
        batches += math.ceil(samples / subset.batch_size)
        views += samples
    steps_per_epoch = max(1, math.ceil(batches / options.gpus))
    if options.max_train_steps is not None:
        epochs = options.max_train_steps / steps_per_epoch
    elif options.max_train_epochs is not None:
        epochs = options.max_train_epochs
    else:
        epochs = DEFAULT_MAX_TRAIN_STEPS / steps_per_epoch
    per_image = epochs * views / count
    if per_image > MAX_VIEWS_PER_IMAGE:
        findings.append(
            _warning(
                "too_many_steps",
                [],
                f"each image is trained on about {per_image:.0f} times ({count} image(s), {epochs:.1f} "
                f"epoch(s)); above {MAX_VIEWS_PER_IMAGE} a LoRA memorises its images: train fewer steps "
                "or add images",
            )
        )
    return findings


def lint_subsets(
    subsets: list[LintSubset], *, dataset: str, config: str | None, options: LintOptions
) -> LintReport:
    """Lint the images of `subsets` for a run planned with `options`."""
    findings: list[LintFinding] = []
    work: list[tuple[LintSubset, Path]] = []
    for subset in subsets:
        if not subset.image_dir.is_dir():
            findings.append(
                LintFinding(
                    kind="image_dir_missing",
                    severity="error",
                    message=f"{subset.where}.image_dir {subset.image_dir} is not a folder",
                )
            )
            continue
        work.extend((subset, path) for path in list_images(subset.image_dir))
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        inspected = list(pool.map(lambda item: _inspect(*item), work))
    findings.extend(_unreadable_findings([item for item in inspected if isinstance(item, _Unreadable)]))
    images = [item for item in inspected if isinstance(item, _Image)]
    if not work:
        findings.append(
            LintFinding(kind="no_images", severity="error", message="the dataset holds no image to train on")
        )
    if images:
        findings.extend(_size_findings(images))
        findings.extend(_duplicate_findings(images))
        findings.extend(_caption_findings(images, options))
        findings.extend(_size_of_run_findings(images, options))
    findings.sort(key=lambda finding: finding.severity != "error")
    return LintReport(
        dataset=dataset, config=config, images=len(work), token_limit=options.token_limit, findings=findings
    )
