"""Model-family detection from keys and shapes: every layout, the released FLUX.2 sizes, the request check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from safetensors.torch import save_file

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.convert import diffusers_to_bfl_transformer
from fluxtrain.training.convert_flux2 import diffusers_to_bfl_flux2
from fluxtrain.training.families.detect import (
    FLUX2_VARIANTS,
    DetectedTransformer,
    check_requested_family,
    detect_from_config,
    detect_from_shapes,
)
from fluxtrain.training.model_checks import check_model_family, check_transformer
from fluxtrain.training.model_files import shipped_config
from fluxtrain.training.tiny import tiny_transformer_config

BASE_FLUX2 = {
    "patch_size": 1,
    "in_channels": 128,
    "attention_head_dim": 128,
    "axes_dims_rope": (32, 32, 32, 32),
}


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _released_flux2_config(family: str) -> dict:
    """The released config of a FLUX.2 transformer, as diffusers' convert_flux2_to_diffusers.py has it."""
    variant = next(v for v in FLUX2_VARIANTS if v.family == family)
    return {
        **BASE_FLUX2,
        "num_layers": variant.num_layers,
        "num_single_layers": variant.num_single_layers,
        "num_attention_heads": variant.hidden // 128,
        "joint_attention_dim": variant.joint_attention_dim,
        "guidance_embeds": variant.guidance,
    }


@pytest.mark.parametrize("family", ["flux2-dev", "flux2-klein-4b", "flux2-klein-9b"])
def test_released_flux2_sizes_are_told_apart_in_every_layout(family: str) -> None:
    config = _released_flux2_config(family)
    with init_empty_weights():
        model = Flux2Transformer2DModel(**config)
    diffusers_shapes = _shapes(model.state_dict())
    bfl_shapes = _shapes(diffusers_to_bfl_flux2(model.state_dict()))
    guided = family == "flux2-dev"
    assert detect_from_shapes(bfl_shapes) == DetectedTransformer(family, "bfl", guided, True)
    comfy = {f"model.diffusion_model.{k}": v for k, v in bfl_shapes.items()}
    assert detect_from_shapes(comfy) == DetectedTransformer(family, "bfl", guided, True)
    assert detect_from_shapes(diffusers_shapes) == DetectedTransformer(family, "diffusers", guided, True)
    folder_config = {"_class_name": "Flux2Transformer2DModel", **config}
    assert detect_from_config(folder_config) == DetectedTransformer(family, "diffusers", guided, True)


def test_flux1_is_recognised_in_bfl_and_diffusers_layouts(
    tiny_models: Path, tiny_schnell_models: Path
) -> None:
    dev = check_transformer(tiny_models / "flux1-dev.sft", "flux1-dev.sft")
    assert dev == DetectedTransformer("flux1", "bfl", True)
    schnell = check_transformer(tiny_schnell_models / "flux1-dev.sft", "flux1-dev.sft")
    assert schnell == DetectedTransformer("flux1", "bfl", False)
    tiny = FluxTransformer2DModel(**tiny_transformer_config())
    assert detect_from_shapes(_shapes(tiny.state_dict())) == DetectedTransformer("flux1", "diffusers", True)
    released = {k: v for k, v in shipped_config("transformer_dev").items() if k != "_class_name"}
    with init_empty_weights():
        full = FluxTransformer2DModel(**released)
    assert detect_from_shapes(_shapes(diffusers_to_bfl_transformer(full.state_dict()))).family == "flux1"
    assert detect_from_config({"_class_name": "FluxTransformer2DModel"}).guidance is None


def test_tiny_flux2_file_is_a_klein_4b_of_another_size(tiny_flux2_models: Path) -> None:
    path = tiny_flux2_models / "flux-2-klein-4b.safetensors"
    assert check_transformer(path, path.name) == DetectedTransformer("flux2-klein-4b", "bfl", False, False)


def test_small_flux2_files_are_classed_by_guidance_and_depth() -> None:
    tiny = {**BASE_FLUX2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48}
    tiny["axes_dims_rope"] = (4, 4, 4, 4)
    for overrides, family in [
        ({"num_layers": 1, "num_single_layers": 1, "guidance_embeds": True}, "flux2-dev"),
        ({"num_layers": 8, "num_single_layers": 1, "guidance_embeds": False}, "flux2-klein-9b"),
        ({"num_layers": 2, "num_single_layers": 1, "guidance_embeds": False}, "flux2-klein-4b"),
    ]:
        sd = Flux2Transformer2DModel(**tiny, **overrides).state_dict()
        assert detect_from_shapes(_shapes(diffusers_to_bfl_flux2(sd))).family == family


def test_other_files_and_flux1_variants_with_extra_channels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="holds no FLUX transformer weights .*found encoder.conv_in"):
        detect_from_shapes({"encoder.conv_in.weight": (16, 3, 3, 3)})
    fill = diffusers_to_bfl_transformer(
        FluxTransformer2DModel(**{**tiny_transformer_config(), "in_channels": 384}).state_dict()
    )
    save_file({k: v.contiguous() for k, v in fill.items()}, str(tmp_path / "flux1-fill.safetensors"))
    with pytest.raises(
        InvalidInputError, match=r"pretrained_model: 'fill' is a FLUX.1 transformer with 384 input"
    ):
        check_transformer(tmp_path / "flux1-fill.safetensors", "fill")
    with pytest.raises(
        InvalidInputError, match="not a FLUX transformer: config.json names class 'Flux2Pipeline'"
    ):
        detect_from_config({"_class_name": "Flux2Pipeline"})


def test_a_requested_family_must_match_the_file() -> None:
    klein = DetectedTransformer("flux2-klein-4b", "bfl", False)
    dev1 = DetectedTransformer("flux1", "bfl", True)
    assert check_requested_family(None, klein, "k.safetensors") == "flux2-klein-4b"
    assert check_requested_family("flux2-klein-4b", klein, "k.safetensors") == "flux2-klein-4b"
    assert check_requested_family("flux1-kontext", dev1, "kontext.sft") == "flux1-kontext"
    with pytest.raises(InvalidInputError) as caught:
        check_requested_family("flux2-klein-9b", klein, "k.safetensors")
    assert str(caught.value) == (
        "model_family: 'flux2-klein-9b' (FLUX.2 [klein] 9B) was asked for, but pretrained_model "
        "'k.safetensors' is a FLUX.2 [klein] 4B transformer ('flux2-klein-4b')"
    )
    with pytest.raises(InvalidInputError, match="'flux1' .*'flux1-dev.sft' is a FLUX.2 \\[klein\\] 4B"):
        check_requested_family("flux1", klein, "flux1-dev.sft")
    with pytest.raises(InvalidInputError, match="flux1-kontext' needs a FLUX.1 dev-architecture .*schnell"):
        check_requested_family("flux1-kontext", DetectedTransformer("flux1", "bfl", False), "schnell.sft")


def test_every_detected_family_is_accepted(tiny_models: Path, tiny_flux2_models: Path) -> None:
    klein = tiny_flux2_models / "flux-2-klein-4b.safetensors"
    assert check_model_family(klein, klein.name, None) == "flux2-klein-4b"  # klein trains now
    assert check_model_family(tiny_models / "flux1-dev.sft", "flux1-dev.sft", "flux1") == "flux1"
