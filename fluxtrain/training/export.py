"""LoRA files as other tools read them, written atomically with kohya-style metadata.

`diffusers` layout: peft names under `transformer.`, e.g.
`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, with the alpha / rank scale folded
into `lora_B`, so diffusers' `FluxPipeline.load_lora_weights`, ComfyUI and Forge apply it as
trained without an alpha entry.
`kohya` layout (sd-scripts' networks/lora_flux.py): `lora_unet_<BFL module path with _>` with
`.lora_down.weight`, `.lora_up.weight` and `.alpha`. BFL fuses q, k, v (and single blocks' MLP
input) into one Linear, so those groups are written as one LoRA of rank k x r: the down weights
stacked, the up weights block-diagonal and alpha x k, which is exactly the same update.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save

from fluxtrain.fsutil import atomic_write_bytes

KOHYA_PREFIX = "lora_unet"
DOUBLE_BLOCK_GROUPS: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
}
SINGLE_BLOCK_GROUPS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
_MODULE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def diffusers_state_dict(
    lora: dict[str, torch.Tensor], *, rank: int, alpha: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """peft weights to the diffusers file layout, scale folded into lora_B."""
    scale = alpha / rank
    out = {}
    for key, value in lora.items():
        tensor = value.detach().float() * (scale if ".lora_B." in key else 1.0)
        out[f"transformer.{key}"] = tensor.to(dtype).contiguous()
    return out


def kohya_state_dict(
    lora: dict[str, torch.Tensor], *, alpha: float, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """peft weights to kohya's lora_unet_* layout with fused qkv / linear1."""
    modules: dict[tuple[str, int], dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in lora.items():
        match = _MODULE.match(key)
        if match is None:
            raise ValueError(f"LoRA weight {key} is outside the double and single blocks")
        kind, index, module, which = match.groups()
        modules.setdefault((kind, int(index)), {}).setdefault(module, {})[which] = value.detach().float()
    out: dict[str, torch.Tensor] = {}
    for (kind, index), found in sorted(modules.items()):
        groups = DOUBLE_BLOCK_GROUPS if kind == "transformer_blocks" else SINGLE_BLOCK_GROUPS
        block = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        used = set()
        for bfl_name, members in groups.items():
            present = [m for m in members if m in found]
            if not present:
                continue
            if len(present) != len(members):
                raise ValueError(f"{kind}.{index}: {bfl_name} needs all of {members}, found {present}")
            used.update(members)
            down = torch.cat([found[m]["A"] for m in members], dim=0)
            up = torch.block_diag(*[found[m]["B"] for m in members])
            name = f"{KOHYA_PREFIX}_{block}_{index}_{bfl_name}"
            out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
            out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha * len(members), dtype=dtype)
        leftover = set(found) - used
        if leftover:
            raise ValueError(f"{kind}.{index}: no kohya name for {sorted(leftover)}")
    return out


def lora_metadata(
    *,
    base_model: str,
    output_name: str,
    rank: int,
    alpha: float,
    steps: int,
    epoch: int,
    resolution: tuple[int, int],
    trigger_words: list[str],
    dataset_hash: str,
    learning_rate: float,
    optimizer: str,
    seed: int,
    num_images: int,
    save_format: str,
    guidance: bool,
) -> dict[str, str]:
    """safetensors metadata, named as kohya's sd-scripts (ss_*) and the SAI model spec name them."""
    width, height = resolution
    return {
        "ss_network_module": "networks.lora_flux",
        "ss_base_model_version": "flux1",
        "ss_sd_model_name": Path(base_model).name,
        "ss_output_name": output_name,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_resolution": f"({width}, {height})",
        "ss_learning_rate": str(learning_rate),
        "ss_optimizer": optimizer,
        "ss_seed": str(seed),
        "ss_num_train_images": str(num_images),
        "ss_dataset_hash": dataset_hash,
        "ss_trigger_word": ", ".join(trigger_words),
        "fluxtrain_format": save_format,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"flux-1-{'dev' if guidance else 'schnell'}/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.trigger_phrase": ", ".join(trigger_words),
    }


def save_lora(
    path: Path,
    lora: dict[str, torch.Tensor],
    *,
    save_format: str,
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    metadata: dict[str, str],
) -> None:
    """Write the LoRA in `save_format` to `path` (temporary file, then rename)."""
    if save_format == "kohya":
        tensors = kohya_state_dict(lora, alpha=alpha, dtype=dtype)
    else:
        tensors = diffusers_state_dict(lora, rank=rank, alpha=alpha, dtype=dtype)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
