"""A run's peak GPU memory, estimated from the transformer's shapes, and the pre-flight that uses it.

The one owner of this arithmetic (the README's figures come from here). Every figure is bytes on
one GPU; data parallel runs hold a full copy per process. With hidden size d, head size h,
D double and S single blocks, LoRA rank r and R = batch x (image tokens + text tokens) rows:

  weights      = every frozen parameter x its storage size: 2 bytes in bf16 (4 with
                 mixed_precision "no"); with fp8_base the linear weights outside the modulation
                 take 1 byte and the modulation, norms and biases stay 2 (`fp8.store_float8`).
                 Parameter counts come from the shapes (24 d^2 + 18 d of linears and
                 12 d^2 + 12 d + 4 h of modulation and norms a double block, 12 d^2 + 8 d and
                 3 d^2 + 3 d + 2 h a single block, plus the embedders and the final layer).
  lora         = P x (weight + gradient + optimizer states) bytes, P = r x (fan_in + fan_out) over
                 the targets (`lora.py`: 36 r d a double block, 17 r d a single block); the LoRA
                 dtype is fp32 (4 bytes) or bf16 with full_bf16; states: adamw 2 copies + 1 more
                 for its foreach step, prodigy 4 + 1, adamw8bit 2 bytes, adafactor its factored
                 rows and columns (fp32) only.
  activations  = without gradient checkpointing every block keeps what autograd saves,
                 42 bytes (double) and 39 bytes (single) per row and hidden unit, and the block
                 being differentiated holds about as much again in gradients: R d (42 D + 39 S + 42);
                 with checkpointing only each block's bf16 input is kept and one block is
                 recomputed with its gradients: R d (2 (D + S) + 2 x 42). Both add 2 R d for the
                 embedders and the final layer, and double without bf16 compute.
  overhead     = the CUDA context (about 0.6 GiB, not in torch's allocated figure) plus 5% of the
                 rest for the caching allocator's fragmentation.

The per-block figures were counted with `torch.autograd.graph.saved_tensors_hooks` on the real
FluxTransformer2DModel under bf16 autocast with the LoRA attached (fp8_base saves the same: the
frozen matmul keeps only its weight); `bench/train_step.py` prints the estimate beside the
measured peak so they can be checked on a GPU.

FLUX.2 (klein 4B / 9B, dev: `Flux2Shape`) is counted the same way from its own shapes: no biases,
a SwiGLU MLP of m = 3 d (its input projection 2 m wide), the modulation shared by all blocks
(15 d^2: stored in float8 with fp8_base, as `fp8.store_float8` keeps only `norm*` modules), 26 d^2
of linears a double block and 13 d^2 a single one (fused qkv + MLP input, fused output), 4 h and
2 h of q/k norms, and 512 text tokens whatever the release. Its LoRA (`families/klein.py`) has
38 r d a double block and 15 r d a single one; autograd saves 47 bytes (double) and 51 bytes
(single) per row and hidden unit, counted as above on one block of each at d = 3072 (the slope
between 128 and 448 rows, so per-matrix LoRA casts drop out; counted so, FLUX.1's blocks give
38.5 and 38.5, under the 42 and 39 used for them, so these figures may be as much low too).
`transformer_shape` picks the shape by the family the file's keys and shapes say (`detect.py`);
Kontext is FLUX.1's transformer, its reference tokens counted as image tokens by `step_size`, as
are FLUX.2 edit pairs' (the most controls any target has, each at its control size).

The pre-flight compares the estimate with the memory of the GPU the run gets: at `/train` on the
local executor's host with the smallest GPU's total memory (a queued run waits for a GPU to be
free), in the trainer with the free memory of its own device before any weight is loaded. A run
that does not fit is refused naming the options that would make it fit; with
`memory_preset: auto` the cheapest of them are applied in `AUTO_STEPS` order until it fits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, computed_field

from fluxtrain.dataset_config.toml_file import load_dataset_config
from fluxtrain.datasets.pairs import pair_controls
from fluxtrain.datasets.store import list_images
from fluxtrain.errors import InvalidInputError
from fluxtrain.model_paths import resolve_model_path
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.convert_flux2 import infer_flux2_config
from fluxtrain.training.families.detect import ModelFamily
from fluxtrain.training.model_checks import check_transformer, header_shapes, transformer_config

GIB = 2**30
PIXELS_PER_TOKEN_SIDE = 16  # the autoencoder's 8x, then 2x2 packing
TEXT_TOKENS = {True: 512, False: 256}  # T5 length by guidance: dev 512, schnell 256 (as cache.py)
FLUX2_TEXT_TOKENS = 512
DOUBLE_BLOCK_SAVED_BYTES = 42  # per row and hidden unit, bf16 compute
SINGLE_BLOCK_SAVED_BYTES = 39
FLUX2_DOUBLE_BLOCK_SAVED_BYTES = 47
FLUX2_SINGLE_BLOCK_SAVED_BYTES = 51
FLUX2_FAMILIES = ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b")
BLOCK_INPUT_BYTES = 2  # a bf16 block input, all that checkpointing keeps
OUTSIDE_BLOCKS_BYTES = 2  # the embedders' and the final layer's saved inputs
CUDA_CONTEXT_BYTES = 600 * 2**20
ALLOCATOR_MARGIN = 0.05
ADAFACTOR_STATE_BYTES = 4
# (field, value) in the order memory_preset auto applies them: cheapest in quality and speed first.
AUTO_STEPS: tuple[tuple[str, Any], ...] = (
    ("gradient_checkpointing", True),
    ("fp8_base", True),
    ("optimizer", "adafactor"),
    ("full_bf16", True),
)


class TransformerShape(BaseModel):
    """The sizes of a FLUX.1 transformer that its memory depends on."""

    model_config = ConfigDict(frozen=True)

    hidden: int
    head_dim: int
    double_blocks: int
    single_blocks: int
    in_channels: int
    out_channels: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance: bool

    @classmethod
    def from_config(cls, config: Any) -> TransformerShape:
        """From FluxTransformer2DModel's config (a dict or the model's FrozenDict)."""
        in_channels = int(config["in_channels"])
        patch = int(config.get("patch_size", 1))
        return cls(
            hidden=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
            head_dim=int(config["attention_head_dim"]),
            double_blocks=int(config["num_layers"]),
            single_blocks=int(config["num_single_layers"]),
            in_channels=in_channels,
            out_channels=patch * patch * int(config.get("out_channels") or in_channels),
            joint_attention_dim=int(config["joint_attention_dim"]),
            pooled_projection_dim=int(config["pooled_projection_dim"]),
            guidance=bool(config.get("guidance_embeds", False)),
        )

    def lora_targets(self) -> list[tuple[int, int, int]]:
        """(fan_in, fan_out, how many) of the linears `lora.py` targets."""
        d = self.hidden
        return [
            (d, d, 8 * self.double_blocks + 3 * self.single_blocks),
            (d, 4 * d, 2 * self.double_blocks + self.single_blocks),
            (4 * d, d, 2 * self.double_blocks),
            (5 * d, d, self.single_blocks),
        ]

    def parameter_counts(self) -> tuple[int, int, int]:
        """(linear weights fp8_base stores in float8, their biases, modulation and norm parameters)."""
        d, h, blocks = self.hidden, self.head_dim, (self.double_blocks, self.single_blocks)
        embed_in = [256, self.pooled_projection_dim] + ([256] if self.guidance else [])
        weights = blocks[0] * 24 * d * d + blocks[1] * 12 * d * d
        weights += sum(fan_in * d + d * d for fan_in in embed_in)
        weights += (self.joint_attention_dim + self.in_channels + self.out_channels) * d
        biases = blocks[0] * 18 * d + blocks[1] * 8 * d + 2 * d * len(embed_in) + 2 * d + self.out_channels
        kept = blocks[0] * (12 * d * d + 12 * d + 4 * h) + blocks[1] * (3 * d * d + 3 * d + 2 * h)
        kept += 2 * d * d + 2 * d
        return weights, biases, kept

    @property
    def text_tokens(self) -> int:
        return TEXT_TOKENS[self.guidance]

    @property
    def block_saved_bytes(self) -> tuple[int, int]:
        """What autograd saves per row and hidden unit in a (double, single) block, bf16 compute."""
        return DOUBLE_BLOCK_SAVED_BYTES, SINGLE_BLOCK_SAVED_BYTES


class Flux2Shape(TransformerShape):
    """The sizes of a FLUX.2 transformer (Flux2Transformer2DModel) that its memory depends on."""

    mlp_hidden: int
    time_channels: int

    @classmethod
    def from_config(cls, config: Any) -> Flux2Shape:
        """From Flux2Transformer2DModel's config (a dict, `infer_flux2_config`'s kwargs or a FrozenDict)."""
        in_channels = int(config["in_channels"])
        patch = int(config.get("patch_size", 1))
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return cls(
            hidden=hidden,
            head_dim=int(config["attention_head_dim"]),
            double_blocks=int(config["num_layers"]),
            single_blocks=int(config["num_single_layers"]),
            in_channels=in_channels,
            out_channels=patch * patch * int(config.get("out_channels") or in_channels),
            joint_attention_dim=int(config["joint_attention_dim"]),
            pooled_projection_dim=0,
            guidance=bool(config.get("guidance_embeds", True)),
            mlp_hidden=int(float(config.get("mlp_ratio", 3.0)) * hidden),
            time_channels=int(config.get("timestep_guidance_channels", 256)),
        )

    def lora_targets(self) -> list[tuple[int, int, int]]:
        """(fan_in, fan_out, how many) of the linears `families/klein.py` targets."""
        d, m, double, single = self.hidden, self.mlp_hidden, self.double_blocks, self.single_blocks
        return [
            (d, d, 8 * double),
            (d, 2 * m, 2 * double),
            (m, d, 2 * double),
            (d, 3 * d + 2 * m, single),
            (d + m, d, single),
        ]

    def parameter_counts(self) -> tuple[int, int, int]:
        """(linear weights fp8_base stores in float8, biases (none), norm parameters and norm_out's
        modulation, which fp8_base keeps)."""
        d, m, h = self.hidden, self.mlp_hidden, self.head_dim
        double = 8 * d * d + 2 * 3 * d * m
        single = d * (3 * d + 2 * m) + (d + m) * d
        weights = self.double_blocks * double + self.single_blocks * single + 15 * d * d
        weights += (1 + int(self.guidance)) * (self.time_channels * d + d * d)
        weights += (self.in_channels + self.joint_attention_dim + self.out_channels) * d
        kept = self.double_blocks * 4 * h + self.single_blocks * 2 * h + 2 * d * d
        return weights, 0, kept

    @property
    def text_tokens(self) -> int:
        return FLUX2_TEXT_TOKENS

    @property
    def block_saved_bytes(self) -> tuple[int, int]:
        return FLUX2_DOUBLE_BLOCK_SAVED_BYTES, FLUX2_SINGLE_BLOCK_SAVED_BYTES


class StepSize(BaseModel):
    """The largest step a run takes: what its activations scale with."""

    model_config = ConfigDict(frozen=True)

    batch_size: int
    image_tokens: int
    text_tokens: int
    resolution: tuple[int, int]

    @property
    def rows(self) -> int:
        return self.batch_size * (self.image_tokens + self.text_tokens)


class MemoryEstimate(BaseModel):
    """Estimated peak GPU memory of one training process, in bytes, by what holds it."""

    weights: int
    lora: int  # the LoRA weights, their gradients and the optimizer's states
    activations: int
    overhead: int

    @computed_field
    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.overhead

    def gib(self) -> dict[str, float]:
        """The breakdown in GiB, rounded to 0.01, as events and messages show it."""
        return {name: round(value / GIB, 2) for name, value in self.model_dump().items()}


class MemoryCheck(BaseModel):
    """What the pre-flight judged: kept in the `started` event."""

    estimate_gib: dict[str, float]
    available_gib: float
    preset: str
    chosen: dict[str, bool | str] | None = None


def _tokens(size: tuple[int, int]) -> int:
    return (size[0] // PIXELS_PER_TOKEN_SIDE) * (size[1] // PIXELS_PER_TOKEN_SIDE)


def _references_per_target(spec: Any) -> int:
    """The most controls any target of the dataset has (`datasets.pairs`' rule; how many a family
    takes is `edit_pairs.MAX_REFERENCES`); a control folder not filled yet counts one."""
    most = 0
    for subset in spec.subsets:
        control_dir = subset.control_dir
        if control_dir is None:
            continue
        if not (control_dir.is_dir() and subset.image_dir.is_dir()):
            most = max(most, 1)
            continue
        targets = (path.stem for path in list_images(subset.image_dir))
        pairing = pair_controls(targets, list_images(control_dir))
        most = max(most, max((len(controls) for controls in pairing.controls.values()), default=1))
    return most


def _reference_tokens(spec: Any) -> int:
    """An edit pair's reference tokens per target: each control at its target's size, or at
    control_resolution, times the most controls a target has."""
    return _references_per_target(spec) * _tokens(spec.control_resolution or spec.resolution)


def step_size(toml_path: Path, *, guidance: bool, text_tokens: int | None = None) -> StepSize:
    """The largest step of the dataset TOML: every bucket's area is at most its resolution's; an
    edit-pair dataset's reference tokens count as image tokens. `text_tokens` defaults to FLUX.1's
    T5 length for `guidance`."""
    datasets = load_dataset_config(toml_path).datasets
    sizes = [
        StepSize(
            batch_size=spec.batch_size,
            image_tokens=_tokens(spec.resolution) + _reference_tokens(spec),
            text_tokens=text_tokens if text_tokens is not None else TEXT_TOKENS[guidance],
            resolution=spec.resolution,
        )
        for spec in datasets
    ]
    return max(sizes, key=lambda size: size.rows)


def _optimizer_state_bytes(
    shape: TransformerShape, config: TrainConfig, lora_params: int, lora_bytes: int
) -> int:
    if config.optimizer == "adamw":
        return 3 * lora_params * lora_bytes
    if config.optimizer == "prodigy":
        return 5 * lora_params * lora_bytes
    if config.optimizer == "adamw8bit":
        return 2 * lora_params
    rank = config.network_dim
    factored = sum(count * (2 * rank + fan_in + fan_out) for fan_in, fan_out, count in shape.lora_targets())
    return factored * ADAFACTOR_STATE_BYTES


def estimate_memory(shape: TransformerShape, config: TrainConfig, step: StepSize) -> MemoryEstimate:
    """Peak GPU memory of training `shape` with `config` at `step` (the formula is the module's)."""
    bf16 = config.mixed_precision != "no"
    weights, biases, kept = shape.parameter_counts()
    if config.fp8_base:
        weight_bytes = weights + 2 * (biases + kept)
    else:
        weight_bytes = (weights + biases + kept) * (2 if bf16 else 4)
    lora_params = sum(count * config.network_dim * (i + o) for i, o, count in shape.lora_targets())
    lora_bytes = 2 if config.full_bf16 else 4
    lora = 2 * lora_params * lora_bytes + _optimizer_state_bytes(shape, config, lora_params, lora_bytes)
    unit = step.rows * shape.hidden * (1 if bf16 else 2)
    double, single = shape.block_saved_bytes
    largest = max(double, single)  # the block differentiated: its saved tensors and as much in gradients
    if config.gradient_checkpointing:
        per_unit = BLOCK_INPUT_BYTES * (shape.double_blocks + shape.single_blocks) + 2 * largest
    else:
        per_unit = double * shape.double_blocks + single * shape.single_blocks + largest
    activations = unit * (per_unit + OUTSIDE_BLOCKS_BYTES)
    allocated = weight_bytes + lora + activations
    overhead = CUDA_CONTEXT_BYTES + math.ceil(ALLOCATOR_MARGIN * allocated)
    return MemoryEstimate(weights=weight_bytes, lora=lora, activations=activations, overhead=overhead)


def _with(config: TrainConfig, changes: dict[str, Any]) -> TrainConfig:
    return TrainConfig.model_validate({**config.model_dump(), **changes})


def _applicable(config: TrainConfig, field: str, value: Any) -> bool:
    """Whether an AUTO_STEPS change would change `config` and keep its meaning."""
    if getattr(config, field) == value:
        return False
    if field in ("fp8_base", "full_bf16"):
        return config.mixed_precision != "no"
    if field == "optimizer":
        return config.optimizer == "adamw"  # prodigy's learning rate is a multiplier, not adafactor's
    return True


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def _refusal(
    shape: TransformerShape, config: TrainConfig, step: StepSize, estimate: MemoryEstimate, available: int
) -> str:
    parts = estimate.gib()
    message = (
        f"the run needs about {_gib(estimate.total)} of GPU memory (weights {parts['weights']}, LoRA with "
        f"gradients and optimizer {parts['lora']}, activations {parts['activations']}, overhead "
        f"{parts['overhead']} GiB) and the GPU has {_gib(available)}; "
    )
    width, height = step.resolution
    lower = (
        f"lower the dataset's resolution ({width}x{height}) or batch_size ({step.batch_size}), or "
        f"network_dim ({config.network_dim})"
    )
    if config.memory_preset == "auto":
        chosen_settings = (config.memory_preset_chosen or {}).items()
        chosen = ", ".join(f"{key}: {json_value(value)}" for key, value in chosen_settings)
        return message + f"memory_preset auto already set {chosen or 'all it can'}; {lower}"
    options = []
    for field, value in AUTO_STEPS:
        if _applicable(config, field, value):
            saved = estimate.total - estimate_memory(shape, _with(config, {field: value}), step).total
            if saved > 0:
                options.append(f"set {field}: {json_value(value)} (saves ~{_gib(saved)})")
    options.append(lower)
    return message + "to fit: " + "; ".join(options) + "; or set memory_preset: auto to choose for you"


def json_value(value: bool | str) -> str:
    """A setting as run.json spells it: true / false, or the string."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def fit_memory(
    config: TrainConfig, *, shape: TransformerShape, step: StepSize, available_bytes: int
) -> tuple[TrainConfig, MemoryCheck]:
    """The config that fits `available_bytes` (memory_preset auto's choice applied) and the judgement.

    Raises InvalidInputError naming what to change when the run cannot fit. A config whose auto
    choice was already made (`memory_preset_chosen` set) is only judged, never changed again.
    """
    if config.memory_preset == "auto" and config.memory_preset_chosen is None:
        chosen: dict[str, bool | str] = {}
        for field, value in AUTO_STEPS:
            if estimate_memory(shape, config, step).total <= available_bytes:
                break
            if _applicable(config, field, value):
                chosen[field] = value
                config = _with(config, {field: value})
        config = _with(config, {"memory_preset_chosen": chosen})
    estimate = estimate_memory(shape, config, step)
    if estimate.total > available_bytes:
        raise InvalidInputError(_refusal(shape, config, step, estimate, available_bytes))
    check = MemoryCheck(
        estimate_gib=estimate.gib(),
        available_gib=round(available_bytes / GIB, 2),
        preset=config.memory_preset,
        chosen=config.memory_preset_chosen,
    )
    return config, check


def check_run_memory(
    config: TrainConfig, *, available_bytes: int | None
) -> tuple[TrainConfig, MemoryCheck | None]:
    """The pre-flight of a resolved config; `available_bytes` None (no CUDA) refuses nothing.

    The transformer's shapes come from its header or config.json and the step from the dataset
    TOML, so nothing is loaded. A TOML that names no resolved dataset is judged by nothing here:
    the trainer refuses it with its own message.
    """
    if available_bytes is None or config.models_root is None or config.dataset_config is None:
        return config, None
    path = resolve_model_path(config.models_root, "pretrained_model", config.pretrained_model)
    shape = transformer_shape(path, config.pretrained_model)
    try:
        step = step_size(config.dataset_config, guidance=shape.guidance, text_tokens=shape.text_tokens)
    except InvalidInputError:
        return config, None
    return fit_memory(config, shape=shape, step=step, available_bytes=available_bytes)


def family_shape(family: ModelFamily, config: Any) -> TransformerShape:
    """The memory shape of a transformer of `family` from its diffusers config: FLUX.1's (Kontext's
    too: the same transformer, its reference tokens counted by `step_size`) or FLUX.2's."""
    return (Flux2Shape if family in FLUX2_FAMILIES else TransformerShape).from_config(config)


def transformer_shape(path: Path, shown: str) -> TransformerShape:
    """The memory shape of the transformer at `path` (a file's header or a folder's config.json),
    of the family its keys and shapes say; nothing is loaded."""
    family = check_transformer(path, shown).family
    if family not in FLUX2_FAMILIES or path.is_dir():
        return family_shape(family, transformer_config(path, shown))
    try:
        return family_shape(family, infer_flux2_config(header_shapes("pretrained_model", path, shown)))
    except InvalidInputError as exc:
        raise InvalidInputError(f"pretrained_model: '{shown}' {exc.message}") from exc


def smallest_gpu_bytes() -> int | None:
    """The total memory of this host's smallest CUDA device, None without CUDA; creates no context."""
    import torch

    if not torch.cuda.is_available():
        return None
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def free_device_bytes(device: Any) -> int:
    """What this process can still use on `device`: its free memory plus the context it already holds."""
    import torch

    return torch.cuda.mem_get_info(device)[0] + CUDA_CONTEXT_BYTES
