"""BFL <-> diffusers key layouts for the FLUX.1 transformer and autoencoder, and configs read from shapes.

The seed ships Black Forest Labs single files (`flux1-dev.sft`, `ae.sft`); training runs on diffusers'
classes. Both directions are exact: every tensor comes back bit for bit after a round trip.

Transformer facts (the same as diffusers' own single-file loader):
  - a double block's fused `img_attn.qkv` / `txt_attn.qkv` hold q, k, v stacked on the output axis;
  - a single block's fused `linear1` holds q, k, v and the MLP input (4 x hidden) stacked likewise;
  - `final_layer.adaLN_modulation.1` emits (shift, scale); diffusers' `norm_out.linear` emits
    (scale, shift), so its rows are swapped halves;
  - RMS norms are `*.scale` in BFL and `*.weight` in diffusers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fluxtrain.errors import InvalidInputError

BFL_PREFIXES = ("model.diffusion_model.",)
VAE_PREFIXES = ("first_stage_model.", "vae.")
MLP_RATIO = 4


@dataclass(frozen=True)
class ModuleRule:
    """One BFL module and the diffusers module(s) its weights go to.

    `diffusers` holds several names when the BFL module is fused (stacked on the output axis, in
    that order); `swap_halves` marks the final modulation whose two output halves trade places;
    `norm` marks RMS norms whose only parameter is `scale` in BFL and `weight` in diffusers.
    """

    bfl: str
    diffusers: tuple[str, ...]
    swap_halves: bool = False
    norm: bool = False


def _embedder_rules(guidance: bool) -> list[ModuleRule]:
    pairs = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if guidance:
        pairs.append(("guidance_in", "guidance_embedder"))
    rules = []
    for bfl, diff in pairs:
        rules.append(ModuleRule(f"{bfl}.in_layer", (f"time_text_embed.{diff}.linear_1",)))
        rules.append(ModuleRule(f"{bfl}.out_layer", (f"time_text_embed.{diff}.linear_2",)))
    rules.append(ModuleRule("txt_in", ("context_embedder",)))
    rules.append(ModuleRule("img_in", ("x_embedder",)))
    return rules


def _double_block_rules(i: int) -> list[ModuleRule]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    return [
        ModuleRule(f"{b}.img_mod.lin", (f"{d}.norm1.linear",)),
        ModuleRule(f"{b}.txt_mod.lin", (f"{d}.norm1_context.linear",)),
        ModuleRule(f"{b}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")),
        ModuleRule(
            f"{b}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")
        ),
        ModuleRule(f"{b}.img_attn.norm.query_norm", (f"{d}.attn.norm_q",), norm=True),
        ModuleRule(f"{b}.img_attn.norm.key_norm", (f"{d}.attn.norm_k",), norm=True),
        ModuleRule(f"{b}.txt_attn.norm.query_norm", (f"{d}.attn.norm_added_q",), norm=True),
        ModuleRule(f"{b}.txt_attn.norm.key_norm", (f"{d}.attn.norm_added_k",), norm=True),
        ModuleRule(f"{b}.img_attn.proj", (f"{d}.attn.to_out.0",)),
        ModuleRule(f"{b}.txt_attn.proj", (f"{d}.attn.to_add_out",)),
        ModuleRule(f"{b}.img_mlp.0", (f"{d}.ff.net.0.proj",)),
        ModuleRule(f"{b}.img_mlp.2", (f"{d}.ff.net.2",)),
        ModuleRule(f"{b}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",)),
        ModuleRule(f"{b}.txt_mlp.2", (f"{d}.ff_context.net.2",)),
    ]


def _single_block_rules(i: int) -> list[ModuleRule]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    return [
        ModuleRule(f"{b}.modulation.lin", (f"{d}.norm.linear",)),
        ModuleRule(f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")),
        ModuleRule(f"{b}.norm.query_norm", (f"{d}.attn.norm_q",), norm=True),
        ModuleRule(f"{b}.norm.key_norm", (f"{d}.attn.norm_k",), norm=True),
        ModuleRule(f"{b}.linear2", (f"{d}.proj_out",)),
    ]


def transformer_module_rules(*, num_double: int, num_single: int, guidance: bool) -> list[ModuleRule]:
    """Every module of a FLUX.1 transformer with these block counts, as BFL <-> diffusers pairs."""
    rules = _embedder_rules(guidance)
    for i in range(num_double):
        rules.extend(_double_block_rules(i))
    for i in range(num_single):
        rules.extend(_single_block_rules(i))
    rules.append(ModuleRule("final_layer.linear", ("proj_out",)))
    rules.append(ModuleRule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True))
    return rules


def _strip_prefix(sd: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _block_count(keys: Any, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split_sizes(rule: ModuleRule, fused_rows: int, hidden: int) -> list[int]:
    if len(rule.diffusers) == 3:
        if fused_rows % 3:
            raise InvalidInputError(f"{rule.bfl}: {fused_rows} rows do not split into q, k, v")
        return [fused_rows // 3] * 3
    return [hidden, hidden, hidden, fused_rows - 3 * hidden]


def _check_no_leftovers(leftover: set[str], what: str) -> None:
    if leftover:
        shown = ", ".join(sorted(leftover)[:8])
        raise InvalidInputError(f"unexpected {what} keys ({len(leftover)}): {shown}")


def bfl_to_diffusers_transformer(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and split) a BFL FLUX.1 transformer state dict into FluxTransformer2DModel keys."""
    sd = _strip_prefix(sd, BFL_PREFIXES)
    if "img_in.weight" not in sd:
        raise InvalidInputError("not a FLUX.1 transformer in BFL layout: img_in.weight is missing")
    hidden = sd["img_in.weight"].shape[0]
    rules = transformer_module_rules(
        num_double=_block_count(sd, "double_blocks"),
        num_single=_block_count(sd, "single_blocks"),
        guidance="guidance_in.in_layer.weight" in sd,
    )
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        params = ("scale",) if rule.norm else ("weight", "bias")
        for param in params:
            key = f"{rule.bfl}.{param}"
            if key not in sd:
                raise InvalidInputError(f"FLUX.1 transformer file lacks {key}")
            used.add(key)
            tensor = sd[key]
            target_param = "weight" if rule.norm else param
            if rule.swap_halves:
                tensor = _swap_halves(tensor)
            if len(rule.diffusers) == 1:
                out[f"{rule.diffusers[0]}.{target_param}"] = tensor
                continue
            parts = torch.split(tensor, _split_sizes(rule, tensor.shape[0], hidden), dim=0)
            for name, part in zip(rule.diffusers, parts, strict=True):
                out[f"{name}.{target_param}"] = part.contiguous()
    _check_no_leftovers(set(sd) - used, "BFL transformer")
    return out


def diffusers_to_bfl_transformer(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and fuse) FluxTransformer2DModel keys into the BFL single-file layout."""
    if "x_embedder.weight" not in sd:
        raise InvalidInputError("not a diffusers FLUX.1 transformer: x_embedder.weight is missing")
    rules = transformer_module_rules(
        num_double=_block_count(sd, "transformer_blocks"),
        num_single=_block_count(sd, "single_transformer_blocks"),
        guidance="time_text_embed.guidance_embedder.linear_1.weight" in sd,
    )
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        params = ("weight",) if rule.norm else ("weight", "bias")
        for param in params:
            keys = [f"{name}.{param}" for name in rule.diffusers]
            missing = [k for k in keys if k not in sd]
            if missing:
                raise InvalidInputError(f"diffusers FLUX.1 transformer lacks {missing[0]}")
            used.update(keys)
            tensor = sd[keys[0]] if len(keys) == 1 else torch.cat([sd[k] for k in keys], dim=0)
            if rule.swap_halves:
                tensor = _swap_halves(tensor)
            out[f"{rule.bfl}.{'scale' if rule.norm else param}"] = tensor
    _check_no_leftovers(set(sd) - used, "diffusers transformer")
    return out


def rope_axes_for_head_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1 splits each head's rotary dims over (index, y, x) as 16/56/56 of 128; keep that shape.

    y and x get the largest even share not above 7/16 of the head, the index axis the rest, so
    128 -> (16, 56, 56) and a tiny 16 -> (4, 6, 6).
    """
    side = (head_dim * 7 // 16) // 2 * 2
    first = head_dim - 2 * side
    if head_dim % 2 or side <= 0 or first <= 0:
        raise InvalidInputError(f"attention head size {head_dim} cannot carry FLUX rotary embeddings")
    return (first, side, side)


def infer_transformer_config(bfl_sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """FluxTransformer2DModel kwargs read off a BFL state dict's tensor shapes."""
    sd = _strip_prefix(bfl_sd, BFL_PREFIXES)
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        norm_key = (
            "double_blocks.0.img_attn.norm.query_norm.scale"
            if "double_blocks.0.img_attn.norm.query_norm.scale" in sd
            else "single_blocks.0.norm.query_norm.scale"
        )
        head_dim = sd[norm_key].shape[0]
        joint_attention_dim = sd["txt_in.weight"].shape[1]
        pooled_projection_dim = sd["vector_in.in_layer.weight"].shape[1]
        out_channels = sd["final_layer.linear.weight"].shape[0]
    except KeyError as exc:
        raise InvalidInputError(f"not a FLUX.1 transformer in BFL layout: {exc.args[0]} is missing") from exc
    if hidden % head_dim:
        raise InvalidInputError(f"hidden size {hidden} is not a multiple of the head size {head_dim}")
    linear1 = sd.get("single_blocks.0.linear1.weight")
    if linear1 is not None and linear1.shape[0] != (3 + MLP_RATIO) * hidden:
        raise InvalidInputError(f"single-block MLP width {linear1.shape[0] - 3 * hidden} is not 4 x {hidden}")
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": None if out_channels == in_channels else int(out_channels),
        "num_layers": _block_count(sd, "double_blocks"),
        "num_single_layers": _block_count(sd, "single_blocks"),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(joint_attention_dim),
        "pooled_projection_dim": int(pooled_projection_dim),
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": rope_axes_for_head_dim(int(head_dim)),
    }


def diffusers_module_to_bfl(
    module_path: str, config: Mapping[str, Any]
) -> tuple[str, int | None, list[int] | None]:
    """Where a diffusers transformer module lives in the BFL file, for kohya-format LoRA export.

    Returns (BFL module name, index of this module's slice in the fused weight, output sizes of
    every slice of that fused weight); index and sizes are None for a module that is not fused.
    `config` is the FluxTransformer2DModel config (model.config works). Example:
    `transformer_blocks.0.attn.to_k` -> ("double_blocks.0.img_attn.qkv", 1, [3072, 3072, 3072]);
    `single_transformer_blocks.3.proj_mlp` -> ("single_blocks.3.linear1", 3, [3072, 3072, 3072, 12288]).
    `norm_out.linear` is refused: its halves are swapped, so no slice maps a LoRA on it.
    """
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    rules = transformer_module_rules(
        num_double=int(config["num_layers"]),
        num_single=int(config["num_single_layers"]),
        guidance=bool(config["guidance_embeds"]),
    )
    for rule in rules:
        if module_path not in rule.diffusers:
            continue
        if rule.swap_halves:
            raise InvalidInputError(f"{module_path} has swapped halves in BFL layout; it has no kohya name")
        if len(rule.diffusers) == 1:
            return rule.bfl, None, None
        sizes = [hidden] * 3 if len(rule.diffusers) == 3 else [hidden] * 3 + [MLP_RATIO * hidden]
        return rule.bfl, rule.diffusers.index(module_path), sizes
    raise InvalidInputError(f"{module_path} is not a module of this FLUX.1 transformer")


def kohya_lora_name(bfl_module: str) -> str:
    """kohya's sd-scripts name for a LoRA on a BFL transformer module (`lora_unet_double_blocks_0_...`)."""
    return "lora_unet_" + bfl_module.replace(".", "_")


# --- autoencoder ---------------------------------------------------------------------------------

_VAE_ATTN_BFL_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_DIFF_TO_BFL = {v: k for k, v in _VAE_ATTN_BFL_TO_DIFF.items()}
_VAE_TOP_LEVEL = re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$")


def _resnet_param_to_diffusers(rest: str) -> str:
    return rest.replace("nin_shortcut.", "conv_shortcut.")


def _resnet_param_to_bfl(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def _vae_key_to_diffusers(key: str, num_up: int) -> str | None:
    if _VAE_TOP_LEVEL.match(key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_param_to_diffusers(m[3])}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_param_to_diffusers(m[3])}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key):
        return f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_param_to_diffusers(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
        return f"{m[1]}.mid_block.attentions.0.{_VAE_ATTN_BFL_TO_DIFF[m[2]]}.{m[3]}"
    return None


def _vae_key_to_bfl(key: str, num_up: int) -> str | None:
    if _VAE_TOP_LEVEL.match(key):
        return key
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_param_to_bfl(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_resnet_param_to_bfl(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_param_to_bfl(m[3])}"
    if m := re.fullmatch(
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
        key,
    ):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_DIFF_TO_BFL[m[2]]}.{m[3]}"
    return None


def _is_vae_attn_projection(bfl_key: str) -> bool:
    return bool(re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight", bfl_key))


def bfl_to_diffusers_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a BFL (LDM) autoencoder state dict into AutoencoderKL keys (1x1 attention convs -> linears)."""
    sd = _strip_prefix(sd, VAE_PREFIXES)
    num_up = _block_count(sd, "decoder.up")
    out: dict[str, Tensor] = {}
    unknown = set()
    for key, tensor in sd.items():
        new = _vae_key_to_diffusers(key, num_up)
        if new is None:
            unknown.add(key)
            continue
        out[new] = tensor[:, :, 0, 0] if _is_vae_attn_projection(key) and tensor.ndim == 4 else tensor
    _check_no_leftovers(unknown, "BFL autoencoder")
    return out


def diffusers_to_bfl_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename AutoencoderKL keys into the BFL (LDM) layout; attention linears become 1x1 convs again."""
    num_up = _block_count(sd, "decoder.up_blocks")
    out: dict[str, Tensor] = {}
    unknown = set()
    for key, tensor in sd.items():
        new = _vae_key_to_bfl(key, num_up)
        if new is None:
            unknown.add(key)
            continue
        out[new] = tensor[:, :, None, None] if _is_vae_attn_projection(new) and tensor.ndim == 2 else tensor
    _check_no_leftovers(unknown, "diffusers autoencoder")
    return out


def infer_vae_config(bfl_sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """AutoencoderKL architecture kwargs read off a BFL autoencoder's tensor shapes.

    Scaling and shift factors are not in the file: take them from the shipped FLUX VAE config.
    """
    sd = _strip_prefix(bfl_sd, VAE_PREFIXES)
    levels = _block_count(sd, "encoder.down")
    try:
        in_channels = sd["encoder.conv_in.weight"].shape[1]
        channels = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
        latent_channels = sd["decoder.conv_in.weight"].shape[1]
        out_channels = sd["decoder.conv_out.weight"].shape[0]
    except KeyError as exc:
        raise InvalidInputError(f"not an autoencoder in BFL layout: {exc.args[0]} is missing") from exc
    if not channels:
        raise InvalidInputError("not an autoencoder in BFL layout: no encoder.down blocks")
    return {
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": _block_count(sd, "encoder.down.0.block"),
        "latent_channels": int(latent_channels),
        "norm_num_groups": math.gcd(32, *channels),
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }
