"""BFL <-> diffusers key layouts for the FLUX.2 transformer and autoencoder, and configs read from shapes.

FLUX.2 ships as Black Forest Labs single files (`flux2-dev.safetensors`, `flux-2-klein-4b.safetensors`,
`ae.safetensors`) and as ComfyUI split files (`diffusion_models/*.safetensors`, `vae/flux2-vae.safetensors`),
which hold the same BFL keys, optionally under `model.diffusion_model.` / `diffusion_model.` (transformer)
or `vae.` / `first_stage_model.` (autoencoder). Both directions are exact: every tensor comes back bit for
bit after a round trip. Diffusers has a single-file loader for the transformer only, hence the VAE here.

Transformer facts (as diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`):
  - no biases anywhere; modulations are shared per stream (`double_stream_modulation_img/txt`,
    `single_stream_modulation`) instead of one per block;
  - a double block's fused `img_attn.qkv` / `txt_attn.qkv` hold q, k, v stacked on the output axis;
    a single block's `linear1` (q, k, v and the SwiGLU input) stays fused in diffusers (`to_qkv_mlp_proj`);
  - `final_layer.adaLN_modulation.1` emits (shift, scale), diffusers' `norm_out.linear` (scale, shift);
  - RMS norms are `*.scale` in BFL and `*.weight` in diffusers.
Autoencoder facts: FLUX.1's LDM layout (see `convert.py`) plus `encoder.quant_conv`, `decoder.post_quant_conv`
(top level in diffusers) and the latent BatchNorm statistics `bn.*`, kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.convert import (
    ModuleRule,
    bfl_to_diffusers_vae,
    diffusers_to_bfl_vae,
    infer_vae_config,
)
from fluxtrain.training.families.detect import TRANSFORMER_PREFIXES, block_count, strip_prefix

FLUX2_VAE_PREFIXES = ("first_stage_model.", "vae.")
FLUX2_MARKER = "single_stream_modulation.lin.weight"
DIFFUSERS_FLUX2_MARKER = "single_stream_modulation.linear.weight"
ROPE_AXES = 4
MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")
_VAE_MOVED = {"encoder.quant_conv": "quant_conv", "decoder.post_quant_conv": "post_quant_conv"}
_VAE_BN_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


def _global_rules(guidance: bool) -> list[ModuleRule]:
    embedders = [("time_in", "timestep_embedder")]
    if guidance:
        embedders.append(("guidance_in", "guidance_embedder"))
    rules = []
    for bfl, diff in embedders:
        rules.append(ModuleRule(f"{bfl}.in_layer", (f"time_guidance_embed.{diff}.linear_1",)))
        rules.append(ModuleRule(f"{bfl}.out_layer", (f"time_guidance_embed.{diff}.linear_2",)))
    for stream in MODULATIONS:
        rules.append(ModuleRule(f"{stream}.lin", (f"{stream}.linear",)))
    rules.append(ModuleRule("img_in", ("x_embedder",)))
    rules.append(ModuleRule("txt_in", ("context_embedder",)))
    return rules


def _double_block_rules(i: int) -> list[ModuleRule]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    return [
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
        ModuleRule(f"{b}.img_mlp.0", (f"{d}.ff.linear_in",)),
        ModuleRule(f"{b}.img_mlp.2", (f"{d}.ff.linear_out",)),
        ModuleRule(f"{b}.txt_mlp.0", (f"{d}.ff_context.linear_in",)),
        ModuleRule(f"{b}.txt_mlp.2", (f"{d}.ff_context.linear_out",)),
    ]


def _single_block_rules(i: int) -> list[ModuleRule]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    return [
        ModuleRule(f"{b}.linear1", (f"{d}.attn.to_qkv_mlp_proj",)),
        ModuleRule(f"{b}.linear2", (f"{d}.attn.to_out",)),
        ModuleRule(f"{b}.norm.query_norm", (f"{d}.attn.norm_q",), norm=True),
        ModuleRule(f"{b}.norm.key_norm", (f"{d}.attn.norm_k",), norm=True),
    ]


def flux2_module_rules(*, num_double: int, num_single: int, guidance: bool) -> list[ModuleRule]:
    """Every module of a FLUX.2 transformer with these block counts, as BFL <-> diffusers pairs."""
    rules = _global_rules(guidance)
    for i in range(num_double):
        rules.extend(_double_block_rules(i))
    for i in range(num_single):
        rules.extend(_single_block_rules(i))
    rules.append(ModuleRule("final_layer.linear", ("proj_out",)))
    rules.append(ModuleRule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True))
    return rules


def _swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _refuse_leftovers(leftover: set[str], what: str) -> None:
    if leftover:
        shown = ", ".join(sorted(leftover)[:8])
        raise InvalidInputError(f"unexpected {what} keys ({len(leftover)}): {shown}")


def _params(sd: Mapping[str, Tensor], module: str) -> tuple[str, ...]:
    """The parameter names a linear has in `sd`: weight (and a bias where a file carries one)."""
    return ("weight", "bias") if f"{module}.bias" in sd else ("weight",)


def bfl_to_diffusers_flux2(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and split) a BFL FLUX.2 transformer state dict into Flux2Transformer2DModel keys."""
    sd = strip_prefix(sd, TRANSFORMER_PREFIXES)
    if FLUX2_MARKER not in sd:
        raise InvalidInputError(f"not a FLUX.2 transformer in BFL layout: {FLUX2_MARKER} is missing")
    rules = flux2_module_rules(
        num_double=block_count(sd, "double_blocks"),
        num_single=block_count(sd, "single_blocks"),
        guidance="guidance_in.in_layer.weight" in sd,
    )
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        for param in ("scale",) if rule.norm else _params(sd, rule.bfl):
            key = f"{rule.bfl}.{param}"
            if key not in sd:
                raise InvalidInputError(f"FLUX.2 transformer file lacks {key}")
            used.add(key)
            tensor = _swap_halves(sd[key]) if rule.swap_halves else sd[key]
            target = "weight" if rule.norm else param
            if len(rule.diffusers) == 1:
                out[f"{rule.diffusers[0]}.{target}"] = tensor
                continue
            if tensor.shape[0] % 3:
                raise InvalidInputError(f"{key}: {tensor.shape[0]} rows do not split into q, k, v")
            for name, part in zip(rule.diffusers, tensor.chunk(3, dim=0), strict=True):
                out[f"{name}.{target}"] = part.contiguous()
    _refuse_leftovers(set(sd) - used, "BFL FLUX.2 transformer")
    return out


def diffusers_to_bfl_flux2(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and fuse) Flux2Transformer2DModel keys into the BFL single-file layout."""
    if DIFFUSERS_FLUX2_MARKER not in sd:
        raise InvalidInputError(f"not a diffusers FLUX.2 transformer: {DIFFUSERS_FLUX2_MARKER} is missing")
    rules = flux2_module_rules(
        num_double=block_count(sd, "transformer_blocks"),
        num_single=block_count(sd, "single_transformer_blocks"),
        guidance="time_guidance_embed.guidance_embedder.linear_1.weight" in sd,
    )
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        for param in ("weight",) if rule.norm else _params(sd, rule.diffusers[0]):
            keys = [f"{name}.{param}" for name in rule.diffusers]
            if missing := [k for k in keys if k not in sd]:
                raise InvalidInputError(f"diffusers FLUX.2 transformer lacks {missing[0]}")
            used.update(keys)
            tensor = sd[keys[0]] if len(keys) == 1 else torch.cat([sd[k] for k in keys], dim=0)
            out[f"{rule.bfl}.{'scale' if rule.norm else param}"] = (
                _swap_halves(tensor) if rule.swap_halves else tensor
            )
    _refuse_leftovers(set(sd) - used, "diffusers FLUX.2 transformer")
    return out


def flux2_rope_axes(head_dim: int) -> tuple[int, ...]:
    """FLUX.2 splits each head's rotary dims evenly over (time, y, x, layer): 128 -> (32, 32, 32, 32)."""
    if head_dim % (2 * ROPE_AXES):
        raise InvalidInputError(
            f"attention head size {head_dim} cannot carry FLUX.2's 4-axis rotary embeddings"
        )
    return (head_dim // ROPE_AXES,) * ROPE_AXES


def infer_flux2_config(state: Mapping[str, Any]) -> dict[str, Any]:
    """Flux2Transformer2DModel kwargs read off a state dict's tensor shapes (or a {key: shape} map),
    in BFL layout or diffusers' (a diffusers-layout single file: its shapes are fused into BFL's on
    the meta device first, so nothing is copied).

    What shapes cannot say (rope theta 2000, eps 1e-6) keeps the class defaults, which are BFL's.
    """
    sd = strip_prefix(state, TRANSFORMER_PREFIXES)
    if DIFFUSERS_FLUX2_MARKER in sd:
        sd = diffusers_to_bfl_flux2({k: torch.empty(_shape(v), device="meta") for k, v in sd.items()})
    try:
        hidden, in_channels = _shape(sd["img_in.weight"])
        head_dim = _shape(sd["single_blocks.0.norm.query_norm.scale"])[0]
        joint_attention_dim = _shape(sd["txt_in.weight"])[1]
        time_channels = _shape(sd["time_in.in_layer.weight"])[1]
        out_channels = _shape(sd["final_layer.linear.weight"])[0]
        fused_rows = _shape(sd["single_blocks.0.linear1.weight"])[0]
    except KeyError as exc:
        raise InvalidInputError(f"not a FLUX.2 transformer in BFL layout: {exc.args[0]} is missing") from exc
    if hidden % head_dim:
        raise InvalidInputError(f"hidden size {hidden} is not a multiple of the head size {head_dim}")
    mlp_hidden, odd = divmod(fused_rows - 3 * hidden, 2)
    if odd or mlp_hidden <= 0:
        raise InvalidInputError(
            f"single-block width {fused_rows} is not q, k, v and a SwiGLU input of {hidden}"
        )
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": None if out_channels == in_channels else int(out_channels),
        "num_layers": block_count(sd, "double_blocks"),
        "num_single_layers": block_count(sd, "single_blocks"),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(joint_attention_dim),
        "timestep_guidance_channels": int(time_channels),
        "mlp_ratio": mlp_hidden / hidden,
        "axes_dims_rope": flux2_rope_axes(int(head_dim)),
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
    }


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


# --- autoencoder ---------------------------------------------------------------------------------


def _rename_modules(sd: Mapping[str, Tensor], renames: Mapping[str, str]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        out[f"{renames.get(module, module)}.{param}"] = tensor
    return out


def bfl_to_diffusers_flux2_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a BFL FLUX.2 autoencoder (`ae.safetensors`, `flux2-vae.safetensors`) to diffusers' keys."""
    sd = strip_prefix(sd, FLUX2_VAE_PREFIXES)
    if "bn.running_mean" not in sd:
        raise InvalidInputError("not a FLUX.2 autoencoder: its latent BatchNorm bn.running_mean is missing")
    stats = {k: sd[k] for k in _VAE_BN_KEYS if k in sd}
    ldm = _rename_modules({k: v for k, v in sd.items() if k not in stats}, _VAE_MOVED)
    return {**bfl_to_diffusers_vae(ldm), **stats}


def diffusers_to_bfl_flux2_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename AutoencoderKLFlux2 keys into the BFL FLUX.2 autoencoder layout."""
    if "bn.running_mean" not in sd:
        raise InvalidInputError("not a diffusers FLUX.2 autoencoder: bn.running_mean is missing")
    stats = {k: sd[k] for k in _VAE_BN_KEYS if k in sd}
    ldm = diffusers_to_bfl_vae({k: v for k, v in sd.items() if k not in stats})
    out = _rename_modules(ldm, {v: k for k, v in _VAE_MOVED.items()})
    return {**out, **stats}


def infer_flux2_vae_config(bfl_sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """AutoencoderKLFlux2 kwargs read off a BFL FLUX.2 autoencoder's tensor shapes.

    BatchNorm eps and momentum are not in the file: they keep the class defaults, which are BFL's.
    """
    sd = strip_prefix(bfl_sd, FLUX2_VAE_PREFIXES)
    config = infer_vae_config(_rename_modules(sd, _VAE_MOVED))
    latent = config["latent_channels"]
    try:
        bn_channels = sd["bn.running_mean"].shape[0]
        levels = range(len(config["block_out_channels"]))
        decoder = [int(sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0]) for i in levels]
    except KeyError as exc:
        raise InvalidInputError(f"not a FLUX.2 autoencoder in BFL layout: {exc.args[0]} is missing") from exc
    side = int(round((bn_channels / latent) ** 0.5))
    if side * side * latent != bn_channels:
        raise InvalidInputError(
            f"BatchNorm width {bn_channels} is not a square patch of {latent} latent channels"
        )
    config["patch_size"] = (side, side)
    config["decoder_block_out_channels"] = None if decoder == config["block_out_channels"] else decoder
    return config
