"""LoRA files: the diffusers layout loads into FluxPipeline exactly; the kohya layout is the same update.

(diffusers' own kohya-FLUX reader assumes the full-size linear1 split, so the kohya file is checked
by rebuilding each fused BFL weight's update instead of loading it into the tiny pipeline.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from fluxtrain.training import model_files
from fluxtrain.training.convert import diffusers_module_to_bfl, kohya_lora_name
from fluxtrain.training.export import save_lora
from fluxtrain.training.lora import add_lora, lora_state_dict
from tests.training.helpers_runs import render, tiny_pipeline

RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def trained(tiny_models: Path) -> torch.nn.Module:
    """The tiny transformer with a LoRA whose up weights are non-zero, as after some training."""
    transformer = model_files.load_transformer(tiny_models / "flux1-dev.sft", dtype=torch.float32)
    add_lora(transformer, rank=RANK, alpha=ALPHA, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return transformer


def _save(path: Path, transformer: torch.nn.Module, save_format: str) -> Path:
    save_lora(
        path,
        lora_state_dict(transformer),
        save_format=save_format,
        rank=RANK,
        alpha=ALPHA,
        dtype=torch.float32,
        metadata={"ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)},
        config=transformer.config,
    )
    return path


def test_both_layouts_load_in_flux_pipeline_and_match_the_trained_model(
    tiny_models: Path, trained: torch.nn.Module, tmp_path: Path
) -> None:
    diffusers_file = _save(tmp_path / "d.safetensors", trained, "diffusers")

    reference = render(tiny_pipeline(tiny_models, transformer=trained))
    pipe = tiny_pipeline(tiny_models)
    base = render(pipe)

    pipe.load_lora_weights(str(diffusers_file), adapter_name="ours")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="ours")
    saved = {k.removeprefix("transformer."): v for k, v in load_file(diffusers_file).items()}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with_lora = render(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    np.testing.assert_allclose(with_lora, reference, atol=1e-4)

    pipe.unload_lora_weights()
    np.testing.assert_allclose(render(pipe), base, atol=1e-6)


def test_kohya_layout_names_fuses_and_scales(trained: torch.nn.Module, tmp_path: Path) -> None:
    path = _save(tmp_path / "k.safetensors", trained, "kohya")
    tensors = load_file(path)
    hidden = trained.config.num_attention_heads * trained.config.attention_head_dim
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    expected = {
        f"lora_unet_double_blocks_0_{name}"
        for name in (
            "img_attn_qkv",
            "img_attn_proj",
            "img_mlp_0",
            "img_mlp_2",
            "txt_attn_qkv",
            "txt_attn_proj",
            "txt_mlp_0",
            "txt_mlp_2",
        )
    } | {f"lora_unet_single_blocks_{i}_{name}" for i in range(2) for name in ("linear1", "linear2")}
    assert modules == expected
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in tensors)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (3 * RANK, hidden)
    assert tensors[f"{qkv}.lora_up.weight"].shape == (3 * hidden, 3 * RANK)
    assert float(tensors[f"{qkv}.alpha"]) == pytest.approx(3 * ALPHA)
    linear1 = "lora_unet_single_blocks_1_linear1"
    assert tensors[f"{linear1}.lora_up.weight"].shape == (3 * hidden + 4 * hidden, 4 * RANK)
    assert float(tensors[f"{linear1}.alpha"]) == pytest.approx(4 * ALPHA)
    assert float(tensors["lora_unet_single_blocks_0_linear2.alpha"]) == pytest.approx(ALPHA)

    # Each fused BFL weight gets exactly the update the separate diffusers modules get.
    lora = lora_state_dict(trained)
    updates: dict[str, dict[int, torch.Tensor]] = {}
    for key in lora:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            delta = lora[f"{module}.lora_B.weight"] @ lora[key] * (ALPHA / RANK)
            bfl, index, _ = diffusers_module_to_bfl(module, trained.config)
            updates.setdefault(bfl, {})[index or 0] = delta
    for bfl, pieces in updates.items():
        name = kohya_lora_name(bfl)
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        kohya_delta = up @ down * (float(tensors[f"{name}.alpha"]) / down.shape[0])
        expected_delta = torch.cat([pieces[i] for i in range(len(pieces))], dim=0)
        torch.testing.assert_close(kohya_delta, expected_delta, atol=1e-6, rtol=1e-5)

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["ss_network_dim"] == str(RANK)
    assert not list(tmp_path.glob(".*.tmp"))
