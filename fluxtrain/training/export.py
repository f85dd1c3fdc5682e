"""LoRA files as other tools read them, written atomically with kohya-style metadata.

`diffusers` layout: peft names under `transformer.`, e.g.
`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, with the alpha / rank scale folded
into `lora_B`, so diffusers' `FluxPipeline.load_lora_weights`, ComfyUI and Forge apply it as
trained without an alpha entry.
`kohya` layout (sd-scripts' networks/lora_flux.py): `lora_unet_<BFL module path with _>` with
`.lora_down.weight`, `.lora_up.weight` and `.alpha`. BFL fuses q, k, v (and single blocks' MLP
input) into one Linear, so those groups are written as one LoRA of rank k x r: the down weights
stacked, the up weights block-diagonal and alpha x k, which is exactly the same update.
`bfl` layout (ComfyUI): the same fused groups under `diffusion_model.<BFL module>.lora_A/B.weight`
with the scale folded into lora_B, as in the diffusers layout.
Which BFL module a diffusers module is part of comes from the model family's `module_rules`
(FLUX.1's `convert.transformer_module_rules` when none is given).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.convert import ModuleRule, diffusers_module_to_bfl, kohya_lora_name
from fluxtrain.training.data import TrainingData
from fluxtrain.training.lora import lora_state_dict

if TYPE_CHECKING:
    from fluxtrain.training.families.family import Family

BEST_CHECKPOINT_KEY = "best_checkpoint"
_LORA_KEY = re.compile(r"^(.+)\.lora_([AB])\.weight$")


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


def _rule_lookup(rules: list[ModuleRule]) -> Callable[[str, Mapping[str, Any]], tuple[str, int | None, Any]]:
    """`diffusers_module_to_bfl` for any family: (BFL module, slice index, the fused slices)."""
    where = {module: (rule, index) for rule in rules for index, module in enumerate(rule.diffusers)}

    def lookup(module: str, config: Mapping[str, Any]) -> tuple[str, int | None, Any]:
        if module not in where or where[module][0].swap_halves:
            raise ValueError(f"{module} has no BFL module a LoRA can be named after")
        rule, index = where[module]
        fused = len(rule.diffusers) > 1
        return rule.bfl, index if fused else None, rule.diffusers if fused else None

    return lookup


def _fused_groups(
    lora: dict[str, torch.Tensor], config: Mapping[str, Any], rules: list[ModuleRule] | None
) -> list[tuple[str, list[dict[str, torch.Tensor]]]]:
    """The LoRA's (A, B) pairs grouped by the BFL module they are part of, in fused order."""
    to_bfl = diffusers_module_to_bfl if rules is None else _rule_lookup(rules)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"{key} is not a LoRA weight")
        modules.setdefault(match.group(1), {})[match.group(2)] = value.detach().float()
    fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    parts: dict[str, int] = {}
    for module, weights in modules.items():
        bfl, index, sizes = to_bfl(module, config)
        fused.setdefault(bfl, {})[index or 0] = weights
        parts[bfl] = len(sizes) if sizes else 1
    groups = []
    for bfl, pieces in sorted(fused.items()):
        if len(pieces) != parts[bfl]:
            raise ValueError(f"{bfl} is fused from {parts[bfl]} modules; the LoRA covers {len(pieces)}")
        groups.append((bfl, [pieces[i] for i in range(parts[bfl])]))
    return groups


def kohya_state_dict(
    lora: dict[str, torch.Tensor],
    *,
    alpha: float,
    dtype: torch.dtype,
    config: Mapping[str, Any],
    rules: list[ModuleRule] | None = None,
) -> dict[str, torch.Tensor]:
    """peft weights to kohya's lora_unet_* layout with fused qkv / linear1; `config` is the transformer's."""
    out: dict[str, torch.Tensor] = {}
    for bfl, ordered in _fused_groups(lora, config, rules):
        name = kohya_lora_name(bfl)
        out[f"{name}.lora_down.weight"] = torch.cat([w["A"] for w in ordered], dim=0).to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = torch.block_diag(*[w["B"] for w in ordered]).to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha * len(ordered), dtype=dtype)
    return out


def bfl_state_dict(
    lora: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    config: Mapping[str, Any],
    rules: list[ModuleRule] | None = None,
) -> dict[str, torch.Tensor]:
    """peft weights to ComfyUI's `diffusion_model.<BFL module>.lora_A/B.weight`, scale folded into B."""
    out: dict[str, torch.Tensor] = {}
    for bfl, ordered in _fused_groups(lora, config, rules):
        down = torch.cat([w["A"] for w in ordered], dim=0)
        up = torch.block_diag(*[w["B"] for w in ordered]) * (alpha / rank)
        out[f"diffusion_model.{bfl}.lora_A.weight"] = down.to(dtype).contiguous()
        out[f"diffusion_model.{bfl}.lora_B.weight"] = up.to(dtype).contiguous()
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
    architecture: tuple[str, str] | None = None,
) -> dict[str, str]:
    """safetensors metadata, named as kohya's sd-scripts (ss_*) and the SAI model spec name them.

    `architecture` is the family's (ss_base_model_version, modelspec.architecture); default FLUX.1's."""
    width, height = resolution
    version, spec = architecture or ("flux1", f"flux-1-{'dev' if guidance else 'schnell'}/lora")
    return {
        "ss_network_module": "networks.lora_flux",
        "ss_base_model_version": version,
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
        "modelspec.architecture": spec,
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
    config: Mapping[str, Any],
    rules: list[ModuleRule] | None = None,
) -> None:
    """Write the LoRA in `save_format` to `path` (temporary file, then rename); `rules` as `_fused_groups`."""
    if save_format == "kohya":
        tensors = kohya_state_dict(lora, alpha=alpha, dtype=dtype, config=config, rules=rules)
    elif save_format == "bfl":
        tensors = bfl_state_dict(lora, rank=rank, alpha=alpha, dtype=dtype, config=config, rules=rules)
    else:
        tensors = diffusers_state_dict(lora, rank=rank, alpha=alpha, dtype=dtype)
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def write_lora_file(
    path: Path,
    transformer: torch.nn.Module,
    *,
    config: TrainConfig,
    data: TrainingData,
    base_model: Path,
    step: int,
    epoch: int,
    dtype: torch.dtype,
    family: Family | None = None,
) -> dict[str, str]:
    """Write the trained LoRA in run.json's `save_format`; returns the metadata of this run at `step`."""
    metadata = lora_metadata(
        base_model=str(base_model),
        output_name=config.output_name,
        rank=config.network_dim,
        alpha=config.network_alpha,
        steps=step,
        epoch=epoch,
        resolution=data.resolution,
        trigger_words=data.trigger_words,
        dataset_hash=data.dataset_hash,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        seed=config.seed,
        num_images=len(data.images),
        save_format=config.save_format,
        guidance=bool(transformer.config.guidance_embeds),
        architecture=family.architecture(transformer.config) if family else None,
    )
    save_lora(
        path,
        lora_state_dict(transformer),
        save_format=config.save_format,
        rank=config.network_dim,
        alpha=config.network_alpha,
        dtype=dtype,
        metadata=metadata,
        config=transformer.config,
        rules=family.module_rules(transformer.config) if family else None,
    )
    return metadata


def mark_best_checkpoint(path: Path) -> None:
    """Add `best_checkpoint: "true"` to a LoRA file's metadata, rewritten atomically, tensors unchanged."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata[BEST_CHECKPOINT_KEY] = "true"
    atomic_write_bytes(path, save(load_file(path), metadata=metadata))
