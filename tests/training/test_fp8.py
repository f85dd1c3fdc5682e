"""fp8_base storage: float8 weights, bf16 compute, and no bf16 weight copy kept for the backward pass."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from fluxtrain.training.distributed import exclude_frozen_from_ddp
from fluxtrain.training.fp8 import STORAGE_DTYPE, Float8Linear, store_float8
from fluxtrain.training.lora import add_lora
from fluxtrain.training.model_files import load_transformer

BF16 = torch.bfloat16


@pytest.fixture
def base(tiny_models: Path) -> nn.Module:
    return load_transformer(tiny_models / "flux1-dev.sft", dtype=BF16)


def _inputs(model: nn.Module, bench_module) -> dict:
    torch.manual_seed(0)
    return bench_module.inputs(model, 64, torch.device("cpu"))


def test_store_float8_keeps_the_modulation_and_biases_in_compute_precision(base: nn.Module) -> None:
    converted = store_float8(base)
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    assert converted == sum(isinstance(m, Float8Linear) for m in linears) > 0
    block = base.transformer_blocks[0]
    assert isinstance(block.attn.to_q, Float8Linear) and block.attn.to_q.weight.dtype == STORAGE_DTYPE
    assert block.attn.to_q.bias.dtype == BF16
    assert type(block.norm1.linear) is nn.Linear and block.norm1.linear.weight.dtype == BF16
    assert type(base.norm_out.linear) is nn.Linear


def test_float8_forward_is_close_to_bf16(base: nn.Module, bench) -> None:
    fp8 = copy.deepcopy(base)
    store_float8(fp8)
    batch = _inputs(base, bench)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        expected, got = base(**batch)[0].float(), fp8(**batch)[0].float()
    assert torch.isfinite(got).all()
    assert nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0) > 0.95


def _lora_grads(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    with torch.autocast("cpu", dtype=BF16):
        model(**batch)[0].float().square().mean().backward()
    return {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


def test_lora_gradients_equal_those_of_the_dequantized_model(base: nn.Module, bench) -> None:
    reference = copy.deepcopy(base)
    torch.manual_seed(1)
    add_lora(base, rank=4, alpha=4.0, dtype=torch.float32, fp8_base=True)
    torch.manual_seed(1)
    add_lora(reference, rank=4, alpha=4.0, dtype=torch.float32)
    with torch.no_grad():
        for (name, ours), theirs in zip(base.named_parameters(), reference.parameters(), strict=True):
            if ours.dtype == STORAGE_DTYPE:
                theirs.copy_(ours.to(BF16))  # the same float8-rounded weights, held in bf16
            elif "lora_B" in name:
                ours.normal_(std=0.02)
                theirs.copy_(ours)
    batch = _inputs(base, bench)
    ours, theirs = _lora_grads(base, batch), _lora_grads(reference, batch)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(name.count("lora_") for name in ours)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=0.05, atol=1e-5), name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backward_keeps_no_bf16_copy_of_a_float8_weight(base: nn.Module, bench, checkpointing: bool) -> None:
    add_lora(base, rank=4, alpha=4.0, dtype=torch.float32, fp8_base=True)
    if checkpointing:
        base.enable_gradient_checkpointing()
    base.train()
    float8_shapes = {tuple(p.shape) for p in base.parameters() if p.dtype == STORAGE_DTYPE}
    saved: list[torch.Tensor] = []
    batch = _inputs(base, bench)
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=BF16):
        loss = base(**batch)[0].float().square().mean()
    copies = [t for t in saved if t.dim() == 2 and tuple(t.shape) in float8_shapes and t.dtype == BF16]
    assert saved and copies == []
    loss.backward()
    assert all(p.grad is not None for name, p in base.named_parameters() if "lora_" in name)


def test_ddp_leaves_the_float8_base_out_of_its_broadcast(base: nn.Module) -> None:
    params = add_lora(base, rank=4, alpha=4.0, dtype=torch.float32, fp8_base=True)
    left_out = exclude_frozen_from_ddp(base)
    assert base._ddp_params_and_buffers_to_ignore == left_out
    assert not any("lora_" in name for name in left_out)
    frozen = [name for name, p in base.named_parameters() if not p.requires_grad]
    assert set(frozen) <= set(left_out) and len(frozen) + len(params) == len(list(base.parameters()))
