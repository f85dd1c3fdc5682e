"""The training images and captions a kohya-style dataset TOML describes.

The file is read by `fluxtrain.dataset_config` (kohya's cascade of `[general]`, `[[datasets]]`
and `[[datasets.subsets]]` resolved there).
Captions come from `<stem><caption_extension>` next to each image (with kohya's default `.caption`,
a `.txt` counts too: fluxtrain writes those), or the subset's `class_tokens` (the trigger word)
when that file is missing. With `shuffle_caption` the comma-separated tags after the first
`keep_tokens` are shuffled; since text-encoder outputs are cached, each caption gets a fixed set
of shuffled variants and a step picks one of them.
`color_aug` and `random_crop` are refused (`check_dataset_options`): latents are cached too.
A subset with a `control_directory` holds edit pairs: each image carries its control images
(paired by `datasets.pairs`), each encoded at its own size: the target's bucket by default, a
bucket of `control_resolution` keeping the control's aspect, or its own size (cut to a multiple
of 16) with `no_resize_control`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from fluxtrain.dataset_config.schema import DatasetSpec
from fluxtrain.dataset_config.toml_file import load_dataset_config
from fluxtrain.datasets.pairs import pair_controls
from fluxtrain.datasets.store import list_images
from fluxtrain.errors import InvalidInputError
from fluxtrain.training.buckets import BucketSpec, Size, choose_bucket
from fluxtrain.training.config import DEFAULT_MAX_TRAIN_STEPS, TrainConfig, check_dataset_options

KOHYA_CAPTION_EXTENSION = ".caption"
IMAGE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)
log = logging.getLogger(__name__)
SHUFFLED_VARIANTS = 8


@dataclass
class TrainImage:
    path: Path
    sha256: str
    size: Size
    bucket: Size
    captions: list[str]
    flip_aug: bool
    num_repeats: int
    dataset_index: int
    controls: list[Path] = field(default_factory=list)  # edit pairs: the reference images, in order
    control_sha256: list[str] = field(default_factory=list)
    control_buckets: list[Size] = field(default_factory=list)


@dataclass
class TrainingData:
    images: list[TrainImage]
    batch_sizes: list[int]
    resolution: Size
    trigger_words: list[str]
    dataset_hash: str
    buckets: dict[Size, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Images times their repeats: what one epoch shows."""
        return sum(image.num_repeats for image in self.images)


def shuffled_captions(caption: str, *, shuffle: bool, keep_tokens: int, seed: str) -> list[str]:
    """The caption itself, plus fixed shuffles of its tags after the first `keep_tokens`."""
    if not shuffle:
        return [caption]
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng = random.Random(seed)
    variants = [", ".join(tags)]
    for _ in range(SHUFFLED_VARIANTS - 1):
        order = rest[:]
        rng.shuffle(order)
        variants.append(", ".join(fixed + order))
    return list(dict.fromkeys(variants))


def _caption_extensions(extension: str) -> tuple[str, ...]:
    """Where captions are looked for; with kohya's default extension a `.txt` (what fluxtrain writes) too."""
    extension = extension if extension.startswith(".") else "." + extension
    return (extension, ".txt") if extension == KOHYA_CAPTION_EXTENSION else (extension,)


def _read_caption(image_path: Path, extensions: tuple[str, ...]) -> str | None:
    for suffix in extensions:
        caption_path = image_path.with_suffix(suffix)
        if caption_path.is_file():
            try:
                text = caption_path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInputError(f"caption {caption_path} is not readable UTF-8 text: {exc}") from exc
            if text:
                return text
    return None


def _content_hash(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise InvalidInputError(f"image {path} cannot be read: {exc.strerror or exc}") from exc


def _image_size(path: Path) -> Size:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).size
    except IMAGE_ERRORS as exc:
        raise InvalidInputError(f"image {path} cannot be read: {exc}") from exc


def control_bucket(dataset: DatasetSpec, spec: BucketSpec, target_bucket: Size, size: Size) -> Size:
    """The size a control image is encoded at (see the module docstring)."""
    if dataset.no_resize_control:
        return (max(16, size[0] - size[0] % 16), max(16, size[1] - size[1] % 16))
    if dataset.control_resolution is not None:
        return choose_bucket(replace(spec, resolution=dataset.control_resolution, enable=True), *size)
    return target_bucket


def load_training_data(toml_path: Path, *, enable_bucket: bool | None = None) -> TrainingData:
    """Read the dataset TOML, find every image and caption, and assign buckets."""
    config = load_dataset_config(toml_path)
    check_dataset_options(config)
    images: list[TrainImage] = []
    trigger_words: list[str] = []
    digest = hashlib.sha256()
    for d_index, dataset in enumerate(config.datasets):
        spec = BucketSpec.of(dataset, enable=enable_bucket)
        if any(side % 16 for side in dataset.resolution) or (spec.enable and spec.steps % 16):
            raise InvalidInputError(
                f"datasets[{d_index}]: resolution and bucket_reso_steps must be multiples of 16 for FLUX.1"
            )
        for s_index, subset in enumerate(dataset.subsets):
            if not subset.image_dir.is_dir():
                raise InvalidInputError(
                    f"datasets[{d_index}].subsets[{s_index}].image_dir {subset.image_dir} is not a folder"
                )
            class_tokens = subset.class_tokens or ""
            if class_tokens:
                trigger_words.append(class_tokens)
            extensions = _caption_extensions(subset.caption_extension)
            uncaptioned = 0
            files = list_images(subset.image_dir)
            control_dir = subset.control_dir
            pairing = pair_controls(
                (path.stem for path in files),
                list_images(control_dir) if control_dir and control_dir.is_dir() else [],
            )
            for path in files:
                sha = _content_hash(path)
                controls = pairing.controls.get(path.stem, [])
                control_sha = [_content_hash(control) for control in controls]
                caption = _read_caption(path, extensions)
                if caption is None:
                    caption, uncaptioned = class_tokens, uncaptioned + 1
                size = _image_size(path)
                bucket = choose_bucket(spec, *size)
                digest.update(f"{sha}\0{caption}\0{subset.num_repeats}\n".encode())
                if control_sha:
                    digest.update(("controls\0" + "\0".join(control_sha) + "\n").encode())
                images.append(
                    TrainImage(
                        path=path,
                        sha256=sha,
                        size=size,
                        bucket=bucket,
                        captions=shuffled_captions(
                            caption, shuffle=subset.shuffle_caption, keep_tokens=subset.keep_tokens, seed=sha
                        ),
                        flip_aug=subset.flip_aug,
                        num_repeats=subset.num_repeats,
                        dataset_index=d_index,
                        controls=controls,
                        control_sha256=control_sha,
                        control_buckets=[
                            control_bucket(dataset, spec, bucket, _image_size(c)) for c in controls
                        ],
                    )
                )
            if uncaptioned:
                log.warning(
                    "datasets[%d].subsets[%d]: %d image(s) in %s have no %s caption and train on the "
                    "class tokens %r",
                    d_index,
                    s_index,
                    uncaptioned,
                    subset.image_dir,
                    " or ".join(extensions),
                    class_tokens,
                )
    if not images:
        raise InvalidInputError(f"dataset_config {toml_path} lists no images")
    return TrainingData(
        images=images,
        batch_sizes=[dataset.batch_size for dataset in config.datasets],
        resolution=config.datasets[0].resolution,
        trigger_words=list(dict.fromkeys(trigger_words)),
        dataset_hash=digest.hexdigest(),
        buckets=_bucket_counts(images),
    )


def _bucket_counts(images: list[TrainImage]) -> dict[Size, int]:
    buckets: dict[Size, int] = {}
    for image in images:
        buckets[image.bucket] = buckets.get(image.bucket, 0) + image.num_repeats
    return buckets


def count_images(toml_path: Path) -> int:
    """The images a dataset TOML lists, counted without reading them (for `/train`'s checks)."""
    config = load_dataset_config(toml_path)
    return sum(
        len(list_images(subset.image_dir))
        for dataset in config.datasets
        for subset in dataset.subsets
        if subset.image_dir.is_dir()
    )


def held_out_count(split: float | int, images: int) -> int:
    """How many of `images` a `validation_split` holds out: a count as given, a fraction of them rounded
    half up and at least one. A split that leaves no image to train on is refused."""
    count = split if isinstance(split, int) else max(1, math.floor(split * images + 0.5))
    if count >= images:
        raise InvalidInputError(
            f"validation_split {split} holds out {count} of the dataset's {images} image(s) and leaves "
            "none to train on"
        )
    return count


def _as_held_out(image: TrainImage) -> TrainImage:
    """A held-out image as validation sees it: unflipped, once, under its caption as written."""
    return replace(image, captions=image.captions[:1], flip_aug=False, num_repeats=1)


def hold_out(data: TrainingData, config: TrainConfig) -> tuple[TrainingData, TrainingData | None]:
    """The images to train on and the held-out ones (None when the run does not validate).

    `validation_split` picks its images with a generator seeded from the run's seed, so the same
    run.json always holds out the same files; `validation_dataset_config` names a dataset of its own.
    Every training image with the content (sha256) of a held-out one is dropped too, so no held-out
    picture is trained on under another name.
    """
    if config.validation_split is not None:
        count = held_out_count(config.validation_split, len(data.images))
        chosen = sorted(random.Random(f"{config.seed}:validation").sample(range(len(data.images)), count))
        held = [data.images[index] for index in chosen]
    elif config.validation_dataset_config is not None:
        held = load_training_data(config.validation_dataset_config).images
    else:
        return data, None
    held_content = {image.sha256 for image in held}
    training = [image for image in data.images if image.sha256 not in held_content]
    if not training:
        if config.validation_dataset_config is not None:
            raise InvalidInputError(
                f"validation_dataset '{Path(config.validation_dataset_config).stem}' holds every image of "
                "the training dataset and leaves none to train on"
            )
        raise InvalidInputError(
            f"validation_split {config.validation_split} holds out {len(held)} image(s) and every other "
            "image is a copy of one of them (same content): none is left to train on"
        )
    held = [_as_held_out(image) for image in held]
    return (
        replace(data, images=training, buckets=_bucket_counts(training)),
        replace(data, images=held, buckets=_bucket_counts(held)),
    )


def run_images(config: TrainConfig) -> tuple[TrainingData, TrainingData | None]:
    """The run's training and held-out images exactly as the trainer takes them; `/train` calls it
    too, so a validation split or dataset that leaves nothing to train on (duplicates included) is a
    422 before any run exists."""
    return hold_out(load_training_data(config.dataset_config, enable_bucket=config.enable_bucket), config)


def epoch_batches(data: TrainingData, *, epoch: int, seed: int) -> list[list[int]]:
    """This epoch's batches as image indices: repeats included, one bucket per batch, shuffled."""
    rng = random.Random(f"{seed}:{epoch}")
    groups: dict[tuple[int, Size, tuple[Size, ...]], list[int]] = {}
    for index, image in enumerate(data.images):
        key = (image.dataset_index, image.bucket, tuple(image.control_buckets))
        groups.setdefault(key, []).extend([index] * image.num_repeats)
    batches: list[list[int]] = []
    for (d_index, _, _), members in sorted(groups.items()):
        rng.shuffle(members)
        size = data.batch_sizes[d_index]
        batches.extend(members[i : i + size] for i in range(0, len(members), size))
    rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class StepPlan:
    """How long a run is: steps per epoch (an epoch's batches shared out over processes) and in all."""

    steps_per_epoch: int
    total_steps: int

    def epochs_at(self, step: int) -> int:
        """Epochs begun by `step` completed steps (a partly trained epoch counts)."""
        return math.ceil(step / self.steps_per_epoch)

    @property
    def total_epochs(self) -> int:
        return self.epochs_at(self.total_steps)


def plan_steps(data: TrainingData, config: TrainConfig, *, num_processes: int) -> StepPlan:
    """run.json's length in steps: max_train_steps, else max_train_epochs, else the default."""
    batches = len(epoch_batches(data, epoch=0, seed=config.seed))
    steps_per_epoch = max(1, math.ceil(batches / num_processes))
    if config.max_train_steps is not None:
        total = config.max_train_steps
    elif config.max_train_epochs is not None:
        total = config.max_train_epochs * steps_per_epoch
    else:
        total = DEFAULT_MAX_TRAIN_STEPS
    return StepPlan(steps_per_epoch=steps_per_epoch, total_steps=total)
