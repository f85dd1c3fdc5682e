"""Precision paths on the CPU: bf16 mixed precision, full_bf16 and fp8_base (float8 storage, bf16 compute).

TrainConfig refuses fp8_base without CUDA (run.json must not promise what the machine cannot run),
so the fp8 run takes a validated bf16 config and switches fp8_base on with `model_copy`: the loop,
the float8 storage and the adapter are the same code that runs on a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fluxtrain.rundir import read_events
from fluxtrain.training.config import TrainConfig, load_config
from fluxtrain.training.fp8 import store_float8
from fluxtrain.training.lora import add_lora, load_lora_transformer
from fluxtrain.training.model_files import load_transformer
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers

FLOAT8 = torch.float8_e4m3fn


def _lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if "lora_" in name}


def test_fp8_base_adds_the_adapter_before_float8_storage(tiny_models: Path) -> None:
    path = tiny_models / "flux1-dev.sft"
    model, params = load_lora_transformer(
        path,
        rank=4,
        alpha=4.0,
        base_dtype=torch.float32,
        lora_dtype=torch.float32,
        fp8_base=True,
        gradient_checkpointing=False,
    )
    to_q = model.transformer_blocks[0].attn.to_q
    assert to_q.base_layer.weight.dtype == FLOAT8
    assert model.single_transformer_blocks[0].proj_mlp.base_layer.weight.dtype == FLOAT8
    lora = _lora_params(model)
    assert len(lora) == len(params) > 0
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    # Built from unquantized weights: peft's kaiming init is not rounded to the float8 grid.
    down = to_q.lora_A["default"].weight
    assert not torch.equal(down, down.to(FLOAT8).float())
    # The adapter's layers carry no casting hook: a forward pass leaves them in float32.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        to_q(torch.randn(2, to_q.in_features, dtype=torch.bfloat16))
    assert down.dtype == torch.float32 and to_q.base_layer.weight.dtype == FLOAT8

    quantized = load_transformer(path, dtype=torch.bfloat16)
    store_float8(quantized)
    with pytest.raises(ValueError, match="float8"):
        add_lora(quantized, rank=4, alpha=4.0, dtype=torch.float32)


@pytest.fixture(scope="module")
def shared(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    return {"toml": helpers.make_dataset(root / "data"), "cache": root / "cache", "root": root}


@pytest.mark.parametrize(
    ("mode", "base", "lora"),
    [
        ("bf16", torch.bfloat16, torch.float32),
        ("full_bf16", torch.bfloat16, torch.bfloat16),
        ("fp8_base", FLOAT8, torch.float32),
        ("fp8_base+full_bf16", FLOAT8, torch.bfloat16),
    ],
)
def test_precision_modes_train_on_the_cpu(
    mode: str, base: torch.dtype, lora: torch.dtype, tiny_models: Path, shared: dict[str, Path]
) -> None:
    run = helpers.make_run(
        shared["root"] / mode,
        models=tiny_models,
        toml=shared["toml"],
        cache=shared["cache"],
        max_train_steps=3,
        mixed_precision="bf16",
        full_bf16=mode.endswith("full_bf16"),
        gradient_checkpointing=mode.startswith("fp8_base"),
        sample_prompts=["zqx, a green disc"],
        sample_every_n_steps=3,
        sample_steps=2,
    )
    config: TrainConfig = load_config(run / "run.json")
    if mode.startswith("fp8_base"):
        config = config.model_copy(update={"fp8_base": True})
    trainer = Trainer(run, config, stop=StopFlag())
    setup = trainer.set_up()
    assert trainer.train(setup) == "finished"

    samples = [e for e in read_events(run / "events.jsonl") if e["event"] == "sample"]
    assert len(samples) == 1 and Path(samples[0]["path"]).is_file()
    losses = [event["loss"] for event in helpers.step_events(run)]
    assert len(losses) == 3 and all(loss is not None and math.isfinite(loss) for loss in losses)
    model = setup.transformer
    assert model.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == base
    assert model.transformer_blocks[0].norm1.linear.weight.dtype == (
        torch.bfloat16 if mode.startswith("fp8_base") else base
    )
    params = _lora_params(model)
    assert {p.dtype for p in params.values()} == {lora}
    assert all(p.requires_grad and torch.isfinite(p).all() for p in params.values())
    # lora_B starts at zero; three steps of AdamW move it.
    assert any(p.abs().max() > 0 for name, p in params.items() if "lora_B" in name)
    states = [setup.optimizer.state[p] for p in setup.params]
    assert {s["exp_avg"].dtype for s in states} == {s["exp_avg_sq"].dtype for s in states} == {lora}
    saved = load_file(run / "output" / "tiny.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}


def test_fp8_base_needs_bf16_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TrainConfig(output_name="x", fp8_base=True).resolved_mixed_precision == "bf16"
    with pytest.raises(ValueError, match="fp8_base computes in bf16"):
        TrainConfig(output_name="x", fp8_base=True, mixed_precision="no")
