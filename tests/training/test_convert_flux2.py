"""FLUX.2 BFL <-> diffusers conversion: exact round trips, configs read from shapes, tiny files that load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import AutoTokenizer, Qwen3ForCausalLM

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.convert_flux2 import (
    bfl_to_diffusers_flux2,
    bfl_to_diffusers_flux2_vae,
    diffusers_to_bfl_flux2,
    diffusers_to_bfl_flux2_vae,
    infer_flux2_config,
    infer_flux2_vae_config,
)
from fluxtrain.training.families.klein import load_flux2_transformer
from fluxtrain.training.tiny_flux2 import (
    KLEIN_TEXT_LAYERS,
    tiny_flux2_transformer_config,
    tiny_flux2_vae_config,
    tiny_qwen3_config,
)


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def _flux2(**overrides: object) -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    return Flux2Transformer2DModel(**{**tiny_flux2_transformer_config(), **overrides})


def test_tiny_bfl_transformer_round_trips_exactly_and_loads(tiny_flux2_models: Path) -> None:
    bfl = load_file(tiny_flux2_models / "flux-2-klein-4b.safetensors")
    assert "single_stream_modulation.lin.weight" in bfl and "guidance_in.in_layer.weight" not in bfl
    diffusers_sd = bfl_to_diffusers_flux2(bfl)
    _assert_same(diffusers_to_bfl_flux2(diffusers_sd), bfl)
    config = infer_flux2_config(bfl)
    assert config == {"out_channels": None, **tiny_flux2_transformer_config()}
    model = Flux2Transformer2DModel(**config).to(torch.bfloat16)
    model.load_state_dict(diffusers_sd, strict=True)
    tokens, text = torch.randn(1, 16, 128), torch.randn(1, 7, config["joint_attention_dim"])
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))[None]
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(7))[None]
    out = model(
        hidden_states=tokens.bfloat16(),
        encoder_hidden_states=text.bfloat16(),
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=text_ids,
    ).sample
    assert out.shape == (1, 16, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("guidance", [True, False])
def test_diffusers_transformer_round_trips_exactly_and_prefixes_are_stripped(guidance: bool) -> None:
    sd = _flux2(num_layers=2, num_single_layers=3, guidance_embeds=guidance).state_dict()
    bfl = diffusers_to_bfl_flux2(sd)
    assert ("guidance_in.in_layer.weight" in bfl) is guidance
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.2.linear1.weight" in bfl
    _assert_same(bfl_to_diffusers_flux2(bfl), sd)
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        _assert_same(bfl_to_diffusers_flux2({f"{prefix}{k}": v for k, v in bfl.items()}), sd)
    shift, scale = bfl["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), sd["norm_out.linear.weight"])


def test_transformer_mapping_agrees_with_diffusers_own_loader_at_full_width() -> None:
    """The released klein 4B width (3072, 128-wide heads, 7680 text) on the meta device."""
    config = {**tiny_flux2_transformer_config(), "num_attention_heads": 24, "attention_head_dim": 128}
    config.update(joint_attention_dim=7680, axes_dims_rope=(32, 32, 32, 32))
    with init_empty_weights():
        model = Flux2Transformer2DModel(**config)
    bfl = diffusers_to_bfl_flux2(model.state_dict())
    ours = bfl_to_diffusers_flux2(bfl)
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert infer_flux2_config(bfl) == {"out_channels": None, **config}


def test_real_flux2_dev_config_is_read_from_shapes() -> None:
    with init_empty_weights():
        model = Flux2Transformer2DModel()
    inferred = infer_flux2_config({k: v.shape for k, v in diffusers_to_bfl_flux2(model.state_dict()).items()})
    defaults = {k: v for k, v in model.config.items() if k in inferred}
    assert inferred == {**defaults, "axes_dims_rope": tuple(defaults["axes_dims_rope"])}
    assert inferred["num_layers"] == 8 and inferred["joint_attention_dim"] == 15360


def test_tiny_bfl_vae_round_trips_exactly_and_loads(tiny_flux2_models: Path) -> None:
    bfl = load_file(tiny_flux2_models / "flux2-vae.safetensors")
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_var"} <= set(bfl)
    assert bfl["encoder.mid.attn_1.q.weight"].ndim == 4
    diffusers_sd = bfl_to_diffusers_flux2_vae(bfl)
    _assert_same(diffusers_to_bfl_flux2_vae(diffusers_sd), bfl)
    _assert_same(bfl_to_diffusers_flux2_vae({f"vae.{k}": v for k, v in bfl.items()}), diffusers_sd)
    config = infer_flux2_vae_config(bfl)
    assert config == {
        **tiny_flux2_vae_config(),
        "norm_num_groups": 16,
        "mid_block_add_attention": True,
        "decoder_block_out_channels": None,
    }
    vae = AutoencoderKLFlux2(**config)
    vae.load_state_dict(diffusers_sd, strict=True)
    assert torch.equal(vae.bn.running_var, bfl["bn.running_var"]) and not torch.all(vae.bn.running_mean == 0)
    latents = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1).latent_dist.mode()
    assert latents.shape == (1, 32, 4, 4)


def test_vae_of_the_released_architecture_round_trips_and_its_config_is_read() -> None:
    with init_empty_weights():
        released = AutoencoderKLFlux2()
    shapes_only = diffusers_to_bfl_flux2_vae(released.state_dict())
    config = infer_flux2_vae_config(shapes_only)
    assert config == {
        k: (list(v) if isinstance(v, tuple) and k != "patch_size" else v)
        for k, v in released.config.items()
        if k in config
    }
    torch.manual_seed(0)
    small = AutoencoderKLFlux2(**{**tiny_flux2_vae_config(), "decoder_block_out_channels": (16, 16, 32, 32)})
    sd = small.state_dict()
    _assert_same(bfl_to_diffusers_flux2_vae(diffusers_to_bfl_flux2_vae(sd)), sd)
    assert infer_flux2_vae_config(diffusers_to_bfl_flux2_vae(sd))["decoder_block_out_channels"] == [
        16,
        16,
        32,
        32,
    ]


def test_unknown_and_missing_keys_are_refused() -> None:
    bfl = diffusers_to_bfl_flux2(_flux2().state_dict())
    with pytest.raises(InvalidInputError, match="unexpected BFL FLUX.2 transformer keys"):
        bfl_to_diffusers_flux2({**bfl, "mystery.weight": torch.zeros(1)})
    with pytest.raises(InvalidInputError, match="lacks txt_in.weight"):
        bfl_to_diffusers_flux2({k: v for k, v in bfl.items() if k != "txt_in.weight"})
    with pytest.raises(InvalidInputError, match="not a FLUX.2 transformer"):
        bfl_to_diffusers_flux2({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)})
    with pytest.raises(InvalidInputError, match="not a FLUX.2 autoencoder"):
        bfl_to_diffusers_flux2_vae({"encoder.conv_in.weight": torch.zeros(1)})


def test_tiny_text_encoder_and_tokenizer_load_with_the_pipeline_layers(tiny_flux2_models: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(
        tiny_flux2_models / "tokenizers" / "qwen3", local_files_only=True
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a dog"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tokenizer.pad_token == "<|endoftext|>"
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tokenizer)))
    result = model.load_state_dict(load_file(tiny_flux2_models / "qwen_3_4b.safetensors"), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]
    hidden = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states
    assert len(hidden) > max(KLEIN_TEXT_LAYERS)


def test_a_diffusers_layout_single_file_loads_as_its_bfl_twin(
    tiny_flux2_models: Path, tmp_path: Path
) -> None:
    """The same transformer from its BFL file and from its state dict saved in diffusers layout, and
    its config read off either file's shapes."""
    bfl_path = tiny_flux2_models / "flux-2-klein-4b.safetensors"
    bfl = load_file(bfl_path)
    twin = tmp_path / "klein-diffusers.safetensors"
    save_file(bfl_to_diffusers_flux2(bfl), twin)
    shapes = {k: v.shape for k, v in load_file(twin).items()}
    assert infer_flux2_config(shapes) == infer_flux2_config(bfl)
    _assert_same(
        load_flux2_transformer(twin, dtype=torch.float32).state_dict(),
        load_flux2_transformer(bfl_path, dtype=torch.float32).state_dict(),
    )
