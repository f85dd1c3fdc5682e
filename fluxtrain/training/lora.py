"""The LoRA adapter on the FLUX transformer, through peft.

Targets (diffusers module names), the attention and MLP projections of every block:
  double blocks `transformer_blocks.N.`: attn.to_q, attn.to_k, attn.to_v, attn.to_out.0 (image
  stream), attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out (text stream),
  ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2 (the two MLPs);
  single blocks `single_transformer_blocks.N.`: attn.to_q, attn.to_k, attn.to_v, proj_mlp
  (BFL's fused linear1) and proj_out (BFL's linear2, attention output and MLP down projection).
Not targeted: the modulation (norm*.linear), the embedders and the final `proj_out`.
In kohya's naming these are img_attn_qkv/proj, txt_attn_qkv/proj, img_mlp_0/2, txt_mlp_0/2,
linear1 and linear2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, ModelMixin
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from fluxtrain.training.fp8 import FLOAT8_DTYPES, store_float8
from fluxtrain.training.model_files import load_transformer
from fluxtrain.training.precision import FP8_COMPUTE_DTYPE

ADAPTER_NAME = "default"
DOUBLE_BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
SINGLE_BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def _alternatives(names: tuple[str, ...]) -> str:
    return "|".join(name.replace(".", r"\.") for name in names)


TARGET_PATTERN = (
    rf"(transformer_blocks\.\d+\.({_alternatives(DOUBLE_BLOCK_TARGETS)}))"
    rf"|(single_transformer_blocks\.\d+\.({_alternatives(SINGLE_BLOCK_TARGETS)}))"
)


def lora_config(*, rank: int, alpha: float, targets: str = TARGET_PATTERN) -> LoraConfig:
    """peft's config for `targets` (FLUX.1's by default); scale alpha / rank as kohya's networks use it."""
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)


def add_lora(
    transformer: ModelMixin,
    *,
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    fp8_base: bool = False,
    targets: str = TARGET_PATTERN,
) -> list[torch.nn.Parameter]:
    """Freeze the transformer, attach the adapter and return its (only) trainable parameters.

    With `fp8_base` the frozen weights are then stored in float8_e4m3fn and computed in bf16
    (`fp8.store_float8`). The order matters, so a model that already holds float8 weights is
    refused: peft builds the adapter in its base layer's dtype (float8 there, so it would start from
    float8-rounded weights).
    Every forward pass of the trainer runs under autocast, which casts each matmul's operands, so
    peft's own cast of every adapter input to the adapter's dtype (an fp32 copy of each projection's
    input with an fp32 LoRA on a bf16 base) is turned off.
    """
    if any(p.dtype in FLOAT8_DTYPES for p in transformer.parameters()):
        raise ValueError("the transformer already stores float8 weights: load it unquantized, pass fp8_base")
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(rank=rank, alpha=alpha, targets=targets), adapter_name=ADAPTER_NAME)
    params = []
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
            param.requires_grad_(True)
            params.append(param)
    if not params:
        raise RuntimeError("the LoRA adapter matched no module of the transformer")
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
    if fp8_base:
        store_float8(transformer, FP8_COMPUTE_DTYPE)
        if any(param.dtype in FLOAT8_DTYPES for param in params):
            raise RuntimeError("float8 storage reached the LoRA weights; they must stay trainable")
    return params


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's names, e.g. `transformer_blocks.0.attn.to_q.lora_A.weight`."""
    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)


def load_lora_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights back in place (resume); every key must match."""
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"saved LoRA state has keys the adapter lacks: {unexpected[:5]}")


def load_lora_transformer(
    path: Path,
    *,
    rank: int,
    alpha: float,
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    fp8_base: bool,
    gradient_checkpointing: bool,
    device: torch.device | str = "cpu",
    load: Callable[..., ModelMixin] = load_transformer,
    targets: str = TARGET_PATTERN,
) -> tuple[FluxTransformer2DModel, list[torch.nn.Parameter]]:
    """The frozen transformer with the LoRA attached, in training mode, and the LoRA's parameters.

    With fp8_base the file is loaded unquantized in the bf16 compute dtype and only moved to float8
    storage after peft has built the adapter (see `add_lora`); all of that happens in host memory,
    so the device never holds the bf16 weights (FLUX.1-dev's 24 GB would not fit a 24 GB card).
    `load(path, dtype=)` and `targets` are the model family's (FLUX.1's by default).
    """
    transformer = load(path, dtype=FP8_COMPUTE_DTYPE if fp8_base else base_dtype)
    params = add_lora(
        transformer, rank=rank, alpha=alpha, dtype=lora_dtype, fp8_base=fp8_base, targets=targets
    )
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device).train()
    return transformer, params
