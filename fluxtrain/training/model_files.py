"""Loading FLUX.1's four models from the seed's single files (or diffusers folders), offline.

Architecture sizes are read from tensor shapes, so the real files and the tiny test files go
through the same code; what a single file cannot say (activation, epsilons, VAE scaling) comes
from the configs shipped in `model_configs/`. Nothing is fetched from a hub when files are local.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.model_paths import MODEL_FIELDS, resolve_model_path
from fluxtrain.training.convert import (
    bfl_to_diffusers_transformer,
    bfl_to_diffusers_vae,
    infer_transformer_config,
    infer_vae_config,
)
from fluxtrain.training.model_checks import SINGLE_FILE_SUFFIXES, check_model, check_model_family
from fluxtrain.training.tokenizers import load_tokenizer, tokenizer_dir

if TYPE_CHECKING:
    from fluxtrain.training.config import TrainConfig

CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "text_model.")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.",)


@cache
def shipped_config(name: str) -> dict[str, Any]:
    """A config shipped with fluxtrain: clip_l, t5xxl, vae, scheduler, scheduler_schnell, transformer_dev."""
    resource = files("fluxtrain.training").joinpath("model_configs", f"{name}.json")
    return json.loads(resource.read_text(encoding="utf-8"))


def make_scheduler(*, schnell: bool = False) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's sampler: dev shifts timesteps with the image size, schnell does not."""
    config = shipped_config("scheduler_schnell" if schnell else "scheduler")
    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})


def _read_single_file(path: Path) -> dict[str, Tensor]:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise InvalidInputError(f"{path.name}: expected a .sft or .safetensors file or a diffusers folder")
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError as exc:
        raise NotFoundError(f"model file {path.name!r} not found in {path.parent}") from exc
    except Exception as exc:
        raise InvalidInputError(f"{path.name} is not a readable safetensors file: {exc}") from exc


def _component_folder(path: Path, subfolder: str) -> Path:
    """A diffusers pipeline folder holds the model in a subfolder; a model folder holds it at its root."""
    return path / subfolder if (path / subfolder / "config.json").is_file() else path


def _dequantize(sd: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Bring every weight to `dtype` in place (one tensor at a time), applying scaled-fp8 scales."""
    scales = {k: sd.pop(k) for k in list(sd) if k.endswith(".scale_weight")}
    for key in list(sd):
        if key == "scaled_fp8" or key.endswith(".scale_input"):
            del sd[key]
            continue
        tensor = sd.pop(key)
        scale = scales.get(key.removesuffix(".weight") + ".scale_weight")
        if scale is not None:
            tensor = tensor.to(torch.float32) * scale.to(torch.float32)
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        sd[key] = tensor.to(dtype)
    return sd


def _assign_weights(model: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    """Put the file's tensors into a model built on the meta device; any gap or surplus is an error."""
    result = model.load_state_dict(dict(sd), strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:5])
        extra = ", ".join(result.unexpected_keys[:5])
        raise InvalidInputError(
            f"{what} does not match its architecture: missing [{missing}], unexpected [{extra}]"
        )


def _block_count(keys: Any, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := regex.match(k))}
    return max(found) + 1 if found else 0


def load_transformer(
    path: Path, *, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> FluxTransformer2DModel:
    """The FLUX.1 transformer from a BFL single file (dev or schnell) or a diffusers folder."""
    if path.is_dir():
        model = FluxTransformer2DModel.from_pretrained(
            _component_folder(path, "transformer"), torch_dtype=dtype, local_files_only=True
        )
    else:
        bfl = _read_single_file(path)
        config = infer_transformer_config(bfl)
        sd = bfl_to_diffusers_transformer(bfl)
        del bfl
        sd = _dequantize(sd, dtype)
        with init_empty_weights():
            model = FluxTransformer2DModel(**config)
        _assign_weights(model, sd, path.name)
    model.requires_grad_(False)
    return model.to(device).eval()


def load_autoencoder(path: Path, *, dtype: torch.dtype, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The FLUX.1 autoencoder from a BFL `ae.sft` or a diffusers folder (scaling/shift of FLUX)."""
    if path.is_dir():
        model = AutoencoderKL.from_pretrained(
            _component_folder(path, "vae"), torch_dtype=dtype, local_files_only=True
        )
    else:
        bfl = _read_single_file(path)
        config = {**shipped_config("vae"), **infer_vae_config(bfl)}
        config.pop("_class_name", None)
        sd = _dequantize(bfl_to_diffusers_vae(bfl), dtype)
        del bfl
        with init_empty_weights():
            model = AutoencoderKL(**config)
        _assign_weights(model, sd, path.name)
    model.requires_grad_(False)
    return model.to(device).eval()


def _strip_known_prefix(sd: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _clip_heads(hidden: int) -> int:
    """CLIP-L's heads are 64 wide; a tiny model below that uses 16-wide heads (shapes do not say)."""
    return hidden // 64 if hidden % 64 == 0 else max(1, hidden // 16)


def clip_config_from_shapes(sd: Mapping[str, Tensor]) -> CLIPTextConfig:
    """CLIPTextConfig for a CLIP-L-style text encoder state dict (keys without `text_model.`)."""
    try:
        vocab, hidden = sd["embeddings.token_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        intermediate = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise InvalidInputError(f"not a CLIP text encoder: {exc.args[0]} is missing") from exc
    values = {**shipped_config("clip_l")}
    values.update(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        projection_dim=int(hidden),
        max_position_embeddings=int(positions),
        intermediate_size=int(intermediate),
        num_hidden_layers=_block_count(sd, r"^encoder\.layers\.(\d+)\."),
        num_attention_heads=_clip_heads(int(hidden)),
    )
    return CLIPTextConfig(**values)


def t5_config_from_shapes(sd: Mapping[str, Tensor]) -> T5Config:
    """T5Config for a T5 encoder state dict (T5-XXL or a tiny one), read off its shapes."""
    attn = "encoder.block.0.layer.0.SelfAttention"
    ff = "encoder.block.0.layer.1.DenseReluDense"
    try:
        vocab, d_model = sd["shared.weight"].shape
        buckets, heads = sd[f"{attn}.relative_attention_bias.weight"].shape
        inner = sd[f"{attn}.q.weight"].shape[0]
    except KeyError as exc:
        raise InvalidInputError(f"not a T5 encoder: {exc.args[0]} is missing") from exc
    gated = f"{ff}.wi_0.weight" in sd
    d_ff = sd[f"{ff}.wi_0.weight" if gated else f"{ff}.wi.weight"].shape[0]
    layers = _block_count(sd, r"^encoder\.block\.(\d+)\.")
    values = {**shipped_config("t5xxl")}
    values.update(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // heads),
        num_heads=int(heads),
        d_ff=int(d_ff),
        num_layers=layers,
        num_decoder_layers=layers,
        relative_attention_num_buckets=int(buckets),
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return T5Config(**values)


def _default_tokenizer_dir(path: Path, kind: str, pipeline_subfolder: str) -> Path:
    if path.is_dir():
        sibling = path.parent / pipeline_subfolder
        if (path / "tokenizer_config.json").is_file():
            return path
        if (path / pipeline_subfolder).is_dir():
            return path / pipeline_subfolder
        if sibling.is_dir():
            return sibling
    return path.parent / "tokenizers" / kind


def load_clip(
    path: Path, *, tokenizer_dir: Path | None, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[CLIPTextModel, PreTrainedTokenizerBase]:
    """CLIP-L text encoder (single file or diffusers folder) and its tokenizer.

    `tokenizer_dir` None means `tokenizers/clip_l` beside the file (or a pipeline's `tokenizer`).
    """
    folder = tokenizer_dir or _default_tokenizer_dir(path, "clip_l", "tokenizer")
    tokenizer = load_tokenizer("clip_l", folder)
    if path.is_dir():
        model = CLIPTextModel.from_pretrained(
            _component_folder(path, "text_encoder"), torch_dtype=dtype, local_files_only=True
        )
    else:
        sd = _strip_known_prefix(_read_single_file(path), CLIP_PREFIXES)
        sd = _dequantize(
            {k: v for k, v in sd.items() if not k.endswith("position_ids") and k != "text_projection.weight"},
            dtype,
        )
        with init_empty_weights():
            model = CLIPTextModel(clip_config_from_shapes(sd))
        _assign_weights(model, sd, path.name)
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def load_t5(
    path: Path, *, tokenizer_dir: Path | None, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[T5EncoderModel, PreTrainedTokenizerBase]:
    """T5-XXL encoder (fp16/bf16/fp8 or scaled-fp8 single file, or a diffusers folder) and tokenizer.

    `tokenizer_dir` None means `tokenizers/t5xxl` beside the file (or a pipeline's `tokenizer_2`).
    """
    folder = tokenizer_dir or _default_tokenizer_dir(path, "t5xxl", "tokenizer_2")
    tokenizer = load_tokenizer("t5xxl", folder)
    if path.is_dir():
        model = T5EncoderModel.from_pretrained(
            _component_folder(path, "text_encoder_2"), torch_dtype=dtype, local_files_only=True
        )
    else:
        sd = _dequantize(_strip_known_prefix(_read_single_file(path), T5_PREFIXES), dtype)
        shared, embed = sd.pop("shared.weight", None), sd.pop("encoder.embed_tokens.weight", None)
        embedding = shared if shared is not None else embed
        if embedding is None:
            raise InvalidInputError(f"{path.name} is not a T5 encoder: shared.weight is missing")
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"] = embedding
        with init_empty_weights():
            model = T5EncoderModel(t5_config_from_shapes(sd))
        _assign_weights(model, sd, path.name)
        model.encoder.embed_tokens.weight = model.shared.weight
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


@dataclass(frozen=True)
class ModelFiles:
    """A run's four models (files or diffusers folders) and its two tokenizer folders."""

    transformer: Path
    ae: Path
    clip_l: Path
    t5xxl: Path
    clip_tokenizer: Path
    t5_tokenizer: Path


def resolve_model_files(config: TrainConfig, models_root: Path) -> ModelFiles:
    """The four model files (resolved as `/train` resolves them), each checked to hold its model, and
    where their tokenizers are."""
    paths = {}
    for field in MODEL_FIELDS:
        value = getattr(config, field)
        paths[field] = resolve_model_path(models_root, field, value)
        check_model(field, paths[field], value)
    check_model_family(paths["pretrained_model"], config.pretrained_model, config.model_family)
    return ModelFiles(
        transformer=paths["pretrained_model"],
        ae=paths["ae"],
        clip_l=paths["clip_l"],
        t5xxl=paths["t5xxl"],
        clip_tokenizer=tokenizer_dir(models_root, "clip_l"),
        t5_tokenizer=tokenizer_dir(models_root, "t5xxl"),
    )
