"""bench/train_step.py's FLOP count: the one MFU is computed from."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fluxtrain.training.families.detect import released_flux2_config
from fluxtrain.training.model_files import shipped_config
from fluxtrain.training.tiny import tiny_transformer_config


@pytest.mark.parametrize("guidance", [True, False])
def test_forward_flops_match_torch_counting_every_matmul(bench: ModuleType, guidance: bool) -> None:
    config = tiny_transformer_config(guidance=guidance)
    model = FluxTransformer2DModel(**config).eval()
    batch = {
        k: v.float() if torch.is_tensor(v) else v
        for k, v in bench.inputs(model, 64, torch.device("cpu")).items()
    }
    assert batch["hidden_states"].shape[1] == 16 and batch["encoder_hidden_states"].shape[1] == 512
    # The math attention kernel runs as batched matmuls, which the counter sees (CPU flash attention is not).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch)
    expected = bench.flux_forward_flops(config, image_tokens=16, text_tokens=512)
    assert counter.get_total_flops() == expected


def test_flux_dev_sizes(bench: ModuleType) -> None:
    config = shipped_config("transformer_dev")
    model = FluxTransformer2DModel(**tiny_transformer_config())
    for resolution, image_tokens in ((1024, 4096), (512, 1024)):
        assert bench.inputs(model, resolution, torch.device("cpu"))["img_ids"].shape[0] == image_tokens
        flops = bench.flux_forward_flops(config, image_tokens=image_tokens, text_tokens=512)
        # 57 blocks of 12 d^2 weights a token and two L^2 d attention matmuls dominate.
        d, joint = 3072, image_tokens + 512
        blocks = 57 * (2 * 12 * d * d * joint + 4 * joint * joint * d)
        assert blocks < flops < 1.01 * blocks
        # Gradient checkpointing recomputes exactly the blocks' forward, the bulk of it.
        recomputed = bench.recomputed_forward_flops(config, image_tokens=image_tokens, text_tokens=512)
        assert blocks < recomputed < flops
    assert bench.flux_forward_flops(config, image_tokens=4096, text_tokens=512) == pytest.approx(
        74.38e12, rel=1e-3
    )


@pytest.mark.parametrize("guidance", [False, True])
def test_flux2_forward_flops_match_torch_counting_every_matmul(bench: ModuleType, guidance: bool) -> None:
    from diffusers import Flux2Transformer2DModel

    from fluxtrain.training.tiny_flux2 import tiny_flux2_transformer_config

    config = {**tiny_flux2_transformer_config(), "guidance_embeds": guidance}
    model = Flux2Transformer2DModel(**config).eval()
    batch = {
        k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in bench.flux2_inputs(model, 64, torch.device("cpu")).items()
    }
    assert batch["hidden_states"].shape[1] == 16 and batch["encoder_hidden_states"].shape[1] == 512
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch)
    expected = bench.flux2_forward_flops(model.config, image_tokens=16, text_tokens=512)
    assert counter.get_total_flops() == expected
    klein = released_flux2_config("flux2-klein-4b")
    assert (klein["num_layers"], klein["num_single_layers"], klein["num_attention_heads"]) == (5, 20, 24)
    dev = released_flux2_config("flux2-dev")
    assert [dev[k] for k in ("num_layers", "num_single_layers", "num_attention_heads")] == [8, 48, 48]
    assert dev["guidance_embeds"] and not klein["guidance_embeds"]


def test_kontext_inputs_append_one_reference_on_the_targets_grid(bench: ModuleType) -> None:
    config = tiny_transformer_config(guidance=True)
    model = FluxTransformer2DModel(**config).eval()
    batch = {
        k: v.float() if torch.is_tensor(v) else v
        for k, v in bench.kontext_inputs(model, 64, torch.device("cpu")).items()
    }
    ids = batch["img_ids"]
    assert batch["hidden_states"].shape[1] == 32 and ids.shape == (32, 3)
    assert ids[:16, 0].eq(0).all() and ids[16:, 0].eq(1).all() and torch.equal(ids[16:, 1:], ids[:16, 1:])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch)
    assert counter.get_total_flops() == bench.flux_forward_flops(config, image_tokens=32, text_tokens=512)


def test_every_family_row_carries_the_pre_flights_estimate(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import sys

    from fluxtrain.training.config import TrainConfig
    from fluxtrain.training.memory import Flux2Shape, StepSize, TransformerShape, estimate_memory
    from fluxtrain.training.tiny_flux2 import tiny_flux2_transformer_config

    shapes = {
        "flux1-kontext": (TransformerShape.from_config(tiny_transformer_config()), 32),
        "flux2-klein-4b": (Flux2Shape.from_config(tiny_flux2_transformer_config()), 16),
        "flux2-dev": (
            Flux2Shape.from_config({**tiny_flux2_transformer_config(), "guidance_embeds": True}),
            16,
        ),
    }
    for family, (shape, image_tokens) in shapes.items():
        argv = ["train_step.py", "--family", family, "--json", "--resolutions", "64", "--steps", "1"]
        argv += ["--warmup", "0", "--fp8-base", "off", "--checkpointing", "on"]
        monkeypatch.setattr(sys, "argv", argv)
        bench.main()
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (row["family"], row["image_tokens"]) == (family, image_tokens)
        assert row["seconds_per_step"] > 0
        config = TrainConfig(
            output_name="bench", network_dim=16, mixed_precision="bf16", gradient_checkpointing=True
        )
        step = StepSize(batch_size=1, image_tokens=image_tokens, text_tokens=512, resolution=(64, 64))
        assert row["estimate"] == estimate_memory(shape, config, step).gib()
