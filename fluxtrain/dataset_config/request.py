"""What a caller asks for: the seed's `DatasetConfig` fields plus the optional kohya options."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator

from fluxtrain.names import SafeName, TriggerWord

MIN_RESOLUTION = 256
MAX_RESOLUTION = 4096
RESOLUTION_STEP = 64
# FLUX latents are 1/8 of the image and packed in 2x2 patches: bucket sides step by 16 at least.
BUCKET_STEP_UNIT = 16

DEFAULT_MAX_BUCKET_RESO = 2048


def _check_resolution(value: int) -> int:
    if not MIN_RESOLUTION <= value <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}")
    if value % RESOLUTION_STEP:
        raise ValueError(f"resolution must be a multiple of {RESOLUTION_STEP}")
    return value


def _check_bucket_step(value: int) -> int:
    if value % BUCKET_STEP_UNIT:
        raise ValueError(f"bucket_reso_steps must be a multiple of {BUCKET_STEP_UNIT}")
    return value


CaptionExtension = Annotated[str, StringConstraints(pattern=r"^\.[A-Za-z0-9_-]{1,16}$")]


class DatasetConfig(BaseModel):
    """Body of `POST /create-dataset-config`, and the options of `fluxtrain config`."""

    output_name: SafeName = Field(description="Dataset folder under $DATA_ROOT/datasets/.")
    trigger_word: TriggerWord = Field(description="Class token every image of the dataset is tied to.")
    num_repeats: int = Field(10, ge=1, le=10_000, description="How often each image is seen per epoch.")
    resolution: Annotated[int, AfterValidator(_check_resolution)] = Field(
        1024, description="Training side in pixels: a multiple of 64 from 256 to 4096."
    )
    batch_size: int = Field(1, ge=1, le=256, description="Images per training step.")
    enable_bucket: bool = Field(True, description="Group images of similar aspect ratio instead of cropping.")
    min_bucket_reso: int = Field(256, ge=64, le=8192, description="Smallest bucket side in pixels.")
    max_bucket_reso: int | None = Field(
        None,
        ge=64,
        le=8192,
        description=f"Largest bucket side: {DEFAULT_MAX_BUCKET_RESO}, or the resolution when larger.",
    )
    bucket_reso_steps: Annotated[int, AfterValidator(_check_bucket_step)] = Field(
        64, ge=16, le=512, description="Bucket sides step by this many pixels (a multiple of 16)."
    )
    shuffle_caption: bool = Field(False, description="Shuffle the comma-separated tags of each caption.")
    keep_tokens: int = Field(1, ge=0, le=255, description="Leading caption tags kept in place on shuffling.")
    caption_extension: CaptionExtension = Field(".txt", description="Suffix of the caption files: '.txt'.")
    flip_aug: bool = Field(False, description="Randomly mirror images left to right.")
    color_aug: bool = Field(False, description="Randomly shift image hue.")
    random_crop: bool = Field(False, description="Crop at a random place instead of the centre.")
    control_resolution: Annotated[int, AfterValidator(_check_resolution)] | None = Field(
        None,
        description="Edit pairs: the side control images are resized to (their own aspect kept); "
        "unset: each control takes its target's bucket size.",
    )
    no_resize_control: bool = Field(
        False, description="Edit pairs: keep control images at their own size (cropped to a multiple of 16)."
    )

    @model_validator(mode="after")
    def _check_buckets(self) -> Self:
        if self.max_bucket_reso is None:
            # kohya needs max_bucket_reso >= resolution; a 4096 run must not trip over the default.
            self.max_bucket_reso = max(DEFAULT_MAX_BUCKET_RESO, self.resolution)
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(
                f"min_bucket_reso ({self.min_bucket_reso}) must not exceed "
                f"max_bucket_reso ({self.max_bucket_reso})"
            )
        if not self.enable_bucket:
            return self
        for key in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(self, key) % self.bucket_reso_steps:
                raise ValueError(f"{key} must be a multiple of bucket_reso_steps ({self.bucket_reso_steps})")
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ValueError(
                f"with enable_bucket, resolution ({self.resolution}) must lie between min_bucket_reso "
                f"({self.min_bucket_reso}) and max_bucket_reso ({self.max_bucket_reso})"
            )
        return self


class DatasetConfigCreated(BaseModel):
    """Answer of `POST /create-dataset-config`, as the seed defines it."""

    message: str = "Dataset config created"
    path: str = Field(description="Absolute path of the written TOML.")
