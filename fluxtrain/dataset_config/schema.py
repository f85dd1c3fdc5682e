"""The kohya-style dataset TOML as pydantic models: the file as written, and the resolved view.

Each section accepts only keys that kohya's sd-scripts accepts in that section, so whatever we
write is a file sd-scripts reads unchanged, and a typo in a hand-written file is an error instead
of a silently ignored option. Edit pairs add musubi-tuner's keys: `control_directory` beside a
subset's images, `control_resolution` and `no_resize_control` per dataset.
Resolution follows kohya's fallbacks: a subset key falls back to
its dataset, then to [general], then to kohya's default; a dataset key to [general], then to the
default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from annotated_types import Len
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from fluxtrain.errors import InvalidInputError

Resolution = PositiveInt | Annotated[list[PositiveInt], Len(2, 2)]

# kohya's own defaults for a DreamBooth-style dataset, used when no section sets a key.
KOHYA_DEFAULTS: dict[str, object] = {
    "num_repeats": 1,
    "shuffle_caption": False,
    "keep_tokens": 0,
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
    "caption_extension": ".caption",
    "class_tokens": None,
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "control_resolution": None,
    "no_resize_control": False,
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SubsetOptions(_Section):
    """Keys a subset may set itself or inherit from its dataset and from [general]."""

    num_repeats: PositiveInt | None = None
    shuffle_caption: bool | None = None
    keep_tokens: int | None = Field(None, ge=0)
    flip_aug: bool | None = None
    color_aug: bool | None = None
    random_crop: bool | None = None
    caption_extension: str | None = None
    class_tokens: str | None = None


class DatasetOptions(_Section):
    """Keys shared by every subset of a dataset; [general] may set them for all datasets."""

    resolution: Resolution | None = None
    batch_size: PositiveInt | None = None
    enable_bucket: bool | None = None
    min_bucket_reso: PositiveInt | None = None
    max_bucket_reso: PositiveInt | None = None
    bucket_reso_steps: PositiveInt | None = None
    bucket_no_upscale: bool | None = None
    control_resolution: Resolution | None = None
    no_resize_control: bool | None = None


class GeneralSection(SubsetOptions, DatasetOptions):
    """`[general]`: defaults for every dataset and subset."""


class SubsetSection(SubsetOptions):
    """`[[datasets.subsets]]`: one folder of images with its captions."""

    image_dir: str
    control_directory: str | None = None


class DatasetSection(SubsetOptions, DatasetOptions):
    """`[[datasets]]`: subsets trained together at one resolution and batch size."""

    subsets: list[SubsetSection] = Field(min_length=1)


class KohyaDatasetToml(_Section):
    """The whole file: `[general]` and `[[datasets]]`; training needs at least one dataset."""

    general: GeneralSection = Field(default_factory=GeneralSection)
    datasets: list[DatasetSection] = Field(default_factory=list)


class SubsetSpec(BaseModel):
    """One subset with every key resolved."""

    model_config = ConfigDict(frozen=True)

    image_dir: Path
    control_dir: Path | None = None
    class_tokens: str | None
    num_repeats: int
    caption_extension: str
    keep_tokens: int
    shuffle_caption: bool
    flip_aug: bool
    color_aug: bool
    random_crop: bool


class DatasetSpec(BaseModel):
    """One dataset with every key resolved; `resolution` is (width, height)."""

    model_config = ConfigDict(frozen=True)

    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    control_resolution: tuple[int, int] | None = None
    no_resize_control: bool = False
    subsets: list[SubsetSpec]


class DatasetConfigFile(BaseModel):
    """A dataset TOML as the trainer uses it: where it came from and its resolved datasets."""

    model_config = ConfigDict(frozen=True)

    path: Path
    datasets: list[DatasetSpec]


def _pick(key: str, *sections: BaseModel) -> object:
    for section in sections:
        value = getattr(section, key, None)
        if value is not None:
            return value
    return KOHYA_DEFAULTS[key]


def _subset_values(*sections: BaseModel) -> dict[str, object]:
    """Kohya's cascade for a subset's keys: the first section (subset, dataset, general) that sets one."""
    return {key: _pick(key, *sections) for key in SubsetOptions.model_fields}


def cascaded_subset_options(document: KohyaDatasetToml) -> dict[str, dict[str, object]]:
    """Every subset's options after the cascade, keyed by where it sits (`datasets[0].subsets[1]`).

    A file with no dataset yet yields its `[general]` alone, so a check of these options can
    name the section that sets them before the rest of the file is complete.
    """
    general = document.general
    if not document.datasets:
        return {"[general]": _subset_values(general)}
    return {
        f"datasets[{d_index}].subsets[{s_index}]": _subset_values(subset, dataset, general)
        for d_index, dataset in enumerate(document.datasets)
        for s_index, subset in enumerate(dataset.subsets)
    }


def resolve_document(document: KohyaDatasetToml, *, path: Path) -> DatasetConfigFile:
    """Apply kohya's fallbacks; a relative `image_dir` or `control_directory` is taken from the TOML's
    own folder."""
    general = document.general
    if not document.datasets:
        raise InvalidInputError("datasets: the file has no [[datasets]] table; training needs one")
    datasets: list[DatasetSpec] = []
    for index, dataset in enumerate(document.datasets):
        resolution = _pick_resolution(dataset, general, index=index)
        control_resolution = _pick("control_resolution", dataset, general)
        subsets = [
            SubsetSpec(
                image_dir=(path.parent / subset.image_dir).resolve(),
                control_dir=(
                    (path.parent / subset.control_directory).resolve() if subset.control_directory else None
                ),
                **_subset_values(subset, dataset, general),
            )
            for subset in dataset.subsets
        ]
        datasets.append(
            DatasetSpec(
                resolution=resolution,
                control_resolution=_as_size(control_resolution) if control_resolution is not None else None,
                subsets=subsets,
                **{
                    key: _pick(key, dataset, general)
                    for key in DatasetOptions.model_fields
                    if key not in ("resolution", "control_resolution")
                },
            )
        )
    return DatasetConfigFile(path=path, datasets=datasets)


def _pick_resolution(dataset: DatasetSection, general: GeneralSection, *, index: int) -> tuple[int, int]:
    value = dataset.resolution if dataset.resolution is not None else general.resolution
    if value is None:
        raise InvalidInputError(f"datasets[{index}] has no resolution, and [general] sets none either")
    return _as_size(value)


def _as_size(value: object) -> tuple[int, int]:
    """A TOML resolution (one side, or [width, height]) as (width, height)."""
    if isinstance(value, int):
        return (value, value)
    assert isinstance(value, list)
    return (value[0], value[1])
