"""The resolved training config: what `/train` validates and what `run.json` holds.

Keys are the `/train` request's field names. Defaults follow kohya's sd-scripts FLUX.1 recipe
where the seed is silent, so its users' settings carry over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fluxtrain.dataset_config.schema import DatasetConfigFile, cascaded_subset_options
from fluxtrain.dataset_config.toml_file import read_dataset_toml
from fluxtrain.errors import InvalidInputError
from fluxtrain.names import SafeName
from fluxtrain.training.families.detect import ModelFamily

DEFAULT_MAX_TRAIN_STEPS = 1600
# Paths run.json always names (absolute), so the trainer never falls back to the service's settings.
RUN_PATHS = ("dataset_config", "models_root", "cache_dir")


def _fraction_or_count(value: object) -> object:
    """Refuse what pydantic would quietly read as a count: true / false, and a number written with a
    fraction part from 1 up (1.0 would hold out one image, not all of them)."""
    if isinstance(value, bool):
        raise ValueError("must be a fraction (0 < x < 1) or a count of images, not true or false")
    written = value.strip() if isinstance(value, str) else value
    if isinstance(written, float) or (isinstance(written, str) and not written.lstrip("+").isdigit()):
        try:
            number = float(written)
        except ValueError:
            return value
        if number >= 1:
            raise ValueError(
                f"{value!r}: a fraction must be below 1 and a count of images is a whole number (1, not 1.0)"
            )
    return value


# A held-out share of the dataset: a fraction of its images, or a count of them (the request model
# carries the annotation, so its check of true / false travels with it).
ValidationSplit = Annotated[
    Annotated[float, Field(gt=0, lt=1)] | Annotated[int, Field(ge=1)], BeforeValidator(_fraction_or_count)
]
# Subset keys that change an image's pixels at every step; latents are encoded once and cached.
PER_STEP_PIXEL_KEYS = ("color_aug", "random_crop")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    output_name: SafeName
    dataset_config: Path | None = Field(None, description="Absolute path of the dataset TOML.")
    pretrained_model: str = Field("flux1-dev.sft", description="FLUX.1 transformer, under the models folder.")
    clip_l: str = Field("clip_l.safetensors", description="CLIP-L text encoder, under the models folder.")
    t5xxl: str = Field("t5xxl_fp16.safetensors", description="T5-XXL text encoder, under the models folder.")
    ae: str = Field("ae.sft", description="Autoencoder, under the models folder.")
    text_encoder: str = Field(
        "qwen_3_4b.safetensors",
        description="FLUX.2 text encoder (Qwen3 for [klein]): a single file or a model folder, under the "
        "models folder; FLUX.1 runs use clip_l and t5xxl instead.",
    )
    model_family: ModelFamily | None = Field(
        None, description="Model family; default: detected from the transformer file's keys and shapes."
    )
    models_root: Path | None = Field(None, description="Folder that relative model paths are taken under.")
    cache_dir: Path | None = Field(None, description="Latent and text-encoder cache folder.")

    max_train_epochs: int | None = Field(None, ge=1, le=100_000, description="Epochs to train.")
    max_train_steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description=f"Steps to train; {DEFAULT_MAX_TRAIN_STEPS} when neither steps nor epochs are given.",
    )
    learning_rate: float = Field(1e-4, gt=0, le=10)
    network_dim: int = Field(4, ge=1, le=1024)
    network_alpha: float = Field(1.0, gt=0)
    save_every_n_epochs: int | None = Field(None, ge=1)
    enable_bucket: bool | None = None
    full_bf16: bool = False

    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = "adamw"
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    seed: int = Field(42, ge=0, lt=2**32)
    mixed_precision: Literal["no", "bf16"] | None = None
    gradient_checkpointing: bool = True
    fp8_base: bool = False
    timestep_sampling: Literal["shift", "sigmoid", "uniform", "flux2_shift"] | None = Field(
        None,
        description="How training draws timesteps; default: the family's (FLUX.1 'shift', FLUX.2 "
        "'flux2_shift', the resolution-dependent shift).",
    )
    discrete_flow_shift: float = Field(3.1582, gt=0)
    sigmoid_scale: float = Field(1.0, gt=0)
    guidance_scale: float = Field(1.0, ge=0)
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    sample_prompts: list[str] = Field(default_factory=list, max_length=64)
    sample_every_n_steps: int | None = Field(None, ge=1)
    sample_every_n_epochs: int | None = Field(None, ge=1)
    save_format: Literal["diffusers", "kohya", "bfl"] = Field(
        "diffusers",
        description="LoRA layout: diffusers (`transformer.*`), kohya (`lora_unet_*` with `.alpha`) or "
        "bfl (`diffusion_model.*`, ComfyUI).",
    )
    sample_steps: int = Field(20, ge=1, le=200, description="Denoising steps of each sample image.")
    sample_guidance_scale: float = Field(3.5, ge=0, description="Distilled guidance of sample images (dev).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    validation_split: ValidationSplit | None = Field(
        None,
        description="Images held out of training for the validation loss: a fraction (0 < x < 1, rounded, "
        "at least one image) or a count; chosen from the seed.",
    )
    validation_dataset_config: Path | None = Field(
        None, description="Absolute path of the held-out dataset's TOML (the request's validation_dataset)."
    )
    validation_every_n_steps: int | None = Field(
        None, ge=1, description="Validation loss every N steps; also at each checkpoint and at the end."
    )
    keep_best_only: bool = Field(
        False,
        description="At the end, delete every epoch checkpoint but the one with the lowest validation loss; "
        "the final file always stays (it is the run's output), best or not.",
    )
    memory_preset: Literal["off", "auto"] = Field(
        "off",
        description="auto: on a GPU, turn on the cheapest memory savers that make the run fit "
        "(gradient_checkpointing, fp8_base, optimizer adafactor, full_bf16, in that order); off: refuse "
        "a run that does not fit, naming what to change.",
    )
    memory_preset_chosen: dict[str, bool | str] | None = Field(
        None, description="What memory_preset auto set, recorded by whoever applied it (not a request field)."
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_fp16(cls, value: object) -> object:
        if value == "fp16":
            raise ValueError(
                "'fp16' is not offered: FLUX.1's activations overflow float16 (diffusers clamps them); "
                "use 'bf16'"
            )
        return value

    @field_validator("dataset_config", "models_root", "cache_dir", "validation_dataset_config")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"must be an absolute path, not {str(value)!r}")
        return value

    @model_validator(mode="after")
    def _check_precision_options(self) -> TrainConfig:
        if self.full_bf16 and self.mixed_precision == "no":
            raise ValueError(f"full_bf16 needs mixed_precision 'bf16', not '{self.mixed_precision}'")
        if self.fp8_base and self.mixed_precision == "no":
            raise ValueError(
                f"fp8_base computes in bf16 and needs mixed_precision 'bf16', not '{self.mixed_precision}'"
            )
        return self

    @model_validator(mode="after")
    def _check_validation_options(self) -> TrainConfig:
        if self.validation_split is not None and self.validation_dataset_config is not None:
            raise ValueError("validation_split and validation_dataset: give one source of held-out images")
        if not self.validates:
            needing = [name for name in ("validation_every_n_steps", "keep_best_only") if getattr(self, name)]
            if needing:
                verb = "needs" if len(needing) == 1 else "need"
                raise ValueError(f"{' and '.join(needing)} {verb} validation_split or validation_dataset")
        return self

    @property
    def validates(self) -> bool:
        """Whether the run computes a validation loss: it holds images out or names a held-out dataset."""
        return self.validation_split is not None or self.validation_dataset_config is not None

    @property
    def resolved_mixed_precision(self) -> Literal["no", "bf16"]:
        """The precision the run uses: as asked, else bf16 with full_bf16, fp8_base or on CUDA, else no."""
        if self.mixed_precision is not None:
            return self.mixed_precision
        if self.full_bf16 or self.fp8_base:
            return "bf16"
        import torch

        return "bf16" if torch.cuda.is_available() else "no"


def cuda_only_options(config: TrainConfig) -> list[str]:
    """The options of `config` that only run on a CUDA GPU, as a message names them.

    Judged where the run executes (the local executor's host at `/train`, the trainer itself),
    never by an API host that hands the run to a Ray cluster.
    """
    found = []
    if config.optimizer == "adamw8bit":
        found.append("optimizer 'adamw8bit'")
    if config.fp8_base:
        found.append("fp8_base")
    return found


def refuse_cuda_only_options(config: TrainConfig, *, where: str) -> None:
    """Raise InvalidInputError naming each CUDA-only option, for a place `where` that has no GPU."""
    if found := cuda_only_options(config):
        verb = "needs" if len(found) == 1 else "need"
        raise InvalidInputError(f"{' and '.join(found)} {verb} a CUDA GPU and {where} has none")


def load_config(path: Path) -> TrainConfig:
    """Read and validate `run.json` for the trainer; a bad value raises InvalidInputError naming the field.

    The file is validated strictly: a number given as a string, `true` for a count or 3.0 for a
    seed is refused rather than coerced, since a file written by hand says exactly what it means.
    It must name every path in RUN_PATHS, and CUDA-only options are refused here when this
    process sees no CUDA device.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InvalidInputError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path} cannot be read: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidInputError(f"{path} must hold one JSON object, not {type(document).__name__}")
    try:
        config = TrainConfig.model_validate_json(text, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'run.json'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInputError(f"invalid {path.name}: {problems}") from exc
    if missing := [field for field in RUN_PATHS if getattr(config, field) is None]:
        raise InvalidInputError(
            f"invalid {path.name}: {', '.join(missing)} missing; a run directory names every path "
            "its trainer uses (the dataset TOML, the models folder, the cache folder)"
        )
    if cuda_only_options(config):
        import torch

        if not torch.cuda.is_available():
            refuse_cuda_only_options(config, where="this machine")
    return config


def _refuse_per_step_pixel_keys(name: str, options: dict[str, dict[str, Any]]) -> None:
    """Refuse subset keys the cached-latent trainer cannot honour instead of ignoring them silently."""
    found = []
    for where, values in options.items():
        keys = [key for key in PER_STEP_PIXEL_KEYS if values.get(key) is True]
        if keys:
            found.append(f"{where} sets {' and '.join(keys)}")
    if found:
        raise InvalidInputError(
            f"dataset config {name}: {'; '.join(found)}. color_aug and random_crop change the pixels at "
            "every step, but fluxtrain encodes each image's latents once and caches them (as kohya's "
            "cache_latents, which refuses them too); set them to false"
        )


def check_dataset_options(dataset: DatasetConfigFile) -> None:
    """The trainer's check of a resolved dataset config."""
    options = {
        f"datasets[{d_index}].subsets[{s_index}]": subset.model_dump()
        for d_index, spec in enumerate(dataset.datasets)
        for s_index, subset in enumerate(spec.subsets)
    }
    _refuse_per_step_pixel_keys(dataset.path.name, options)


def check_dataset_for_training(toml_path: Path) -> None:
    """`/train`'s check of a dataset TOML, before a run exists.

    The file is read and its sections checked; the per-step options are judged through kohya's
    cascade. What only matters once training starts (a resolution, the image folders) is the
    trainer's to check.
    """
    document = read_dataset_toml(toml_path)
    _refuse_per_step_pixel_keys(Path(toml_path).name, cascaded_subset_options(document))
