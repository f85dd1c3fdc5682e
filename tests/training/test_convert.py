"""BFL <-> diffusers key conversion: exact round trips, configs read from shapes, LoRA name mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from torch import Tensor

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.convert import (
    bfl_to_diffusers_transformer,
    bfl_to_diffusers_vae,
    diffusers_module_to_bfl,
    diffusers_to_bfl_transformer,
    diffusers_to_bfl_vae,
    infer_transformer_config,
    infer_vae_config,
    kohya_lora_name,
    rope_axes_for_head_dim,
)
from fluxtrain.training.model_files import shipped_config
from fluxtrain.training.tiny import tiny_transformer_config, tiny_vae_config


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def _transformer(**overrides: object) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**{**tiny_transformer_config(), **overrides})


def test_transformer_bfl_file_round_trip_is_exact(tiny_models: Path) -> None:
    bfl = load_file(tiny_models / "flux1-dev.sft")
    diffusers_sd = bfl_to_diffusers_transformer(bfl)
    _assert_same(diffusers_to_bfl_transformer(diffusers_sd), bfl)
    model_sd = FluxTransformer2DModel(**infer_transformer_config(bfl)).state_dict()
    assert {k: v.shape for k, v in diffusers_sd.items()} == {k: v.shape for k, v in model_sd.items()}


def test_transformer_diffusers_round_trip_is_exact_and_prefix_is_stripped() -> None:
    sd = _transformer(num_layers=2, num_single_layers=3).state_dict()
    bfl = diffusers_to_bfl_transformer(sd)
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.2.linear1.bias" in bfl
    _assert_same(bfl_to_diffusers_transformer(bfl), sd)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    _assert_same(bfl_to_diffusers_transformer(prefixed), sd)


def test_final_modulation_halves_are_swapped() -> None:
    sd = _transformer().state_dict()
    bfl = diffusers_to_bfl_transformer(sd)
    shift, scale = bfl["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), sd["norm_out.linear.weight"])


def test_transformer_mapping_agrees_with_diffusers_own_loader() -> None:
    """Full-width (3072) blocks on the meta device: diffusers' converter hard-codes that width."""
    config = {**shipped_config("transformer_dev"), "num_layers": 1, "num_single_layers": 1}
    config.pop("_class_name")
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    bfl = diffusers_to_bfl_transformer(model.state_dict())
    ours = bfl_to_diffusers_transformer(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_vae_round_trips_are_exact_and_match_diffusers_ldm_conversion(tiny_models: Path) -> None:
    bfl = load_file(tiny_models / "ae.sft")
    assert bfl["encoder.mid.attn_1.q.weight"].ndim == 4
    diffusers_sd = bfl_to_diffusers_vae(bfl)
    _assert_same(diffusers_to_bfl_vae(diffusers_sd), bfl)
    _assert_same(diffusers_sd, convert_ldm_vae_checkpoint(dict(bfl), tiny_vae_config()))
    torch.manual_seed(1)
    model_sd = AutoencoderKL(**{**tiny_vae_config(), "block_out_channels": [32, 64, 64, 64]}).state_dict()
    _assert_same(bfl_to_diffusers_vae(diffusers_to_bfl_vae(model_sd)), model_sd)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"guidance_embeds": False},
        {"num_layers": 2, "num_single_layers": 1, "num_attention_heads": 3, "attention_head_dim": 32},
        {"in_channels": 16, "joint_attention_dim": 24, "pooled_projection_dim": 20},
        {"in_channels": 96, "out_channels": 64},
    ],
)
def test_transformer_config_is_read_from_shapes(overrides: dict) -> None:
    config = {**tiny_transformer_config(), **overrides}
    config["axes_dims_rope"] = rope_axes_for_head_dim(config["attention_head_dim"])
    bfl = diffusers_to_bfl_transformer(FluxTransformer2DModel(**config).state_dict())
    assert ("guidance_in.in_layer.weight" in bfl) is config["guidance_embeds"]
    assert infer_transformer_config(bfl) == {"out_channels": None, **config}


def test_schnell_file_has_no_guidance(tiny_schnell_models: Path) -> None:
    config = infer_transformer_config(load_file(tiny_schnell_models / "flux1-dev.sft"))
    assert config["guidance_embeds"] is False


def test_real_flux_dev_and_vae_configs_are_read_from_shapes() -> None:
    dev = shipped_config("transformer_dev")
    with init_empty_weights():
        model = FluxTransformer2DModel(**{k: v for k, v in dev.items() if k != "_class_name"})
    inferred = infer_transformer_config(diffusers_to_bfl_transformer(model.state_dict()))
    assert inferred["num_attention_heads"] == 24 and inferred["attention_head_dim"] == 128
    assert inferred["num_layers"] == 19 and inferred["num_single_layers"] == 38
    assert inferred["axes_dims_rope"] == (16, 56, 56)
    assert {k: v for k, v in inferred.items() if k != "axes_dims_rope"} == {
        "out_channels": None,
        **{k: v for k, v in dev.items() if k not in ("_class_name", "axes_dims_rope")},
    }
    vae = shipped_config("vae")
    with init_empty_weights():
        ae = AutoencoderKL(**{k: v for k, v in vae.items() if k != "_class_name"})
    inferred_vae = infer_vae_config(diffusers_to_bfl_vae(ae.state_dict()))
    assert inferred_vae == {k: vae[k] for k in inferred_vae}


def test_vae_config_is_read_from_shapes() -> None:
    config = {**tiny_vae_config(), "block_out_channels": [32, 64, 64], "layers_per_block": 2}
    config["norm_num_groups"] = 32
    config["down_block_types"] = ["DownEncoderBlock2D"] * 3
    config["up_block_types"] = ["UpDecoderBlock2D"] * 3
    bfl = diffusers_to_bfl_vae(AutoencoderKL(**config).state_dict())
    inferred = infer_vae_config(bfl)
    assert inferred == {
        **{k: config[k] for k in inferred if k != "mid_block_add_attention"},
        "mid_block_add_attention": True,
    }


def test_module_mapping_points_at_the_right_slice_of_the_fused_weight() -> None:
    model = _transformer(num_layers=2, num_single_layers=2)
    bfl = diffusers_to_bfl_transformer(model.state_dict())
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "blocks" in name
    ]
    assert "single_transformer_blocks.1.proj_mlp" in linears
    for name in linears:
        bfl_module, index, sizes = diffusers_module_to_bfl(name, model.config)
        fused = bfl[f"{bfl_module}.weight"]
        weight = model.get_submodule(name).weight
        part = fused if index is None else torch.split(fused, sizes)[index]
        assert torch.equal(part, weight), name
    assert diffusers_module_to_bfl("transformer_blocks.0.attn.add_v_proj", model.config)[:2] == (
        "double_blocks.0.txt_attn.qkv",
        2,
    )
    assert kohya_lora_name("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"


def test_module_mapping_of_real_sizes_and_refusals() -> None:
    dev = shipped_config("transformer_dev")
    assert diffusers_module_to_bfl("single_transformer_blocks.37.proj_mlp", dev) == (
        "single_blocks.37.linear1",
        3,
        [3072, 3072, 3072, 12288],
    )
    assert diffusers_module_to_bfl("transformer_blocks.18.ff.net.2", dev) == (
        "double_blocks.18.img_mlp.2",
        None,
        None,
    )
    with pytest.raises(InvalidInputError, match="swapped"):
        diffusers_module_to_bfl("norm_out.linear", dev)
    with pytest.raises(InvalidInputError, match="not a module"):
        diffusers_module_to_bfl("transformer_blocks.19.attn.to_q", dev)


def test_unknown_and_missing_keys_are_refused() -> None:
    bfl = diffusers_to_bfl_transformer(_transformer().state_dict())
    with pytest.raises(InvalidInputError, match="unexpected BFL transformer keys"):
        bfl_to_diffusers_transformer({**bfl, "mystery.weight": torch.zeros(1)})
    incomplete = {k: v for k, v in bfl.items() if k != "txt_in.bias"}
    with pytest.raises(InvalidInputError, match="txt_in.bias"):
        bfl_to_diffusers_transformer(incomplete)
    with pytest.raises(InvalidInputError, match="img_in.weight"):
        infer_transformer_config({"foo": torch.zeros(1)})
    with pytest.raises(InvalidInputError, match="unexpected BFL autoencoder keys"):
        bfl_to_diffusers_vae({"encoder.conv_in.weight": torch.zeros(1), "lpips.weight": torch.zeros(1)})


def test_rope_axes() -> None:
    assert rope_axes_for_head_dim(128) == (16, 56, 56)
    assert sum(rope_axes_for_head_dim(16)) == 16
    with pytest.raises(InvalidInputError):
        rope_axes_for_head_dim(3)
