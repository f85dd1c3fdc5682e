"""The memory estimate on FLUX.1-dev and FLUX.2 shapes (no weights), its refusals and memory_preset auto."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import read_events
from fluxtrain.training import memory
from fluxtrain.training.config import TrainConfig, load_config
from fluxtrain.training.families.detect import FLUX2_VARIANTS
from fluxtrain.training.families.klein import TARGET_PATTERN as KLEIN_TARGETS
from fluxtrain.training.fp8 import KEPT_IN_COMPUTE_DTYPE
from fluxtrain.training.lora import TARGET_PATTERN
from fluxtrain.training.memory import (
    GIB,
    Flux2Shape,
    StepSize,
    TransformerShape,
    check_run_memory,
    estimate_memory,
    fit_memory,
)
from fluxtrain.training.model_checks import transformer_config
from fluxtrain.training.model_files import shipped_config
from fluxtrain.training.tiny import tiny_transformer_config
from fluxtrain.training.tiny_flux2 import tiny_flux2_transformer_config
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers

# FLUX.1-dev, counted on the meta-device model below: every parameter, the linear weights fp8_base
# stores in float8, and the rest (their biases, the modulation and the norms) kept in bf16.
DEV_PARAMS = 11_901_408_320
DEV_FP8_WEIGHTS = 8_651_931_648
DEV_KEPT = DEV_PARAMS - DEV_FP8_WEIGHTS
# The LoRA targets of one double (36 r d) and one single block (17 r d), d = 3072, 19 + 38 blocks.
DEV_LORA_PER_RANK = 3072 * (19 * 36 + 38 * 17)
CONTEXT = 600 * 2**20
AT_1024 = StepSize(batch_size=1, image_tokens=4096, text_tokens=512, resolution=(1024, 1024))
# FLUX.2 at the released sizes (128-wide heads), counted on meta-device models as above: every
# parameter, the float8 linear weights (the shared modulation among them; norm_out's stays bf16),
# and the LoRA's fan_in + fan_out per rank (38 d a double block, 15 d a single one).
FLUX2 = {
    "flux2-klein-4b": (3_875_544_576, 3_856_662_528, 3072 * (5 * 38 + 20 * 15), 5 * 12 + 20 * 2),
    "flux2-klein-9b": (9_078_581_248, 9_045_016_576, 4096 * (8 * 38 + 24 * 15), 8 * 12 + 24 * 2),
    "flux2-dev": (32_223_281_152, 32_147_767_296, 6144 * (8 * 38 + 48 * 15), 8 * 12 + 48 * 2),
}


def _flux2_config(family: str) -> dict[str, object]:
    variant = next(v for v in FLUX2_VARIANTS if v.family == family)
    return {
        "num_layers": variant.num_layers,
        "num_single_layers": variant.num_single_layers,
        "num_attention_heads": variant.hidden // 128,
        "attention_head_dim": 128,
        "joint_attention_dim": variant.joint_attention_dim,
        "guidance_embeds": variant.guidance,
    }


@pytest.fixture(scope="module")
def dev() -> TransformerShape:
    return TransformerShape.from_config(shipped_config("transformer_dev"))


def _config(**fields: object) -> TrainConfig:
    return TrainConfig(output_name="memory", **fields)


def _total(allocated: int) -> int:
    return allocated + CONTEXT + math.ceil(0.05 * allocated)


def test_parameter_and_lora_counts_match_the_real_architecture(dev: TransformerShape) -> None:
    with init_empty_weights():
        model = FluxTransformer2DModel(
            **{k: v for k, v in shipped_config("transformer_dev").items() if k[0] != "_"}
        )
    float8 = biases = 0
    lora_fans, lora_modules = 0, 0
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and not any(part in name for part in KEPT_IN_COMPUTE_DTYPE):
            float8 += module.weight.numel()
            biases += module.bias.numel() if module.bias is not None else 0
        if re.fullmatch(TARGET_PATTERN, name):
            lora_fans += module.in_features + module.out_features
            lora_modules += 1
    total = sum(p.numel() for p in model.parameters())
    assert (total, float8) == (DEV_PARAMS, DEV_FP8_WEIGHTS)
    weights, bias_count, kept = dev.parameter_counts()
    assert (weights, bias_count, weights + bias_count + kept) == (float8, biases, total)
    targets = dev.lora_targets()
    assert sum(count * (i + o) for i, o, count in targets) == lora_fans == DEV_LORA_PER_RANK
    assert sum(count for _, _, count in targets) == lora_modules == 19 * 12 + 38 * 5


def test_flux_dev_bf16_with_checkpointing_at_1024(dev: TransformerShape) -> None:
    estimate = estimate_memory(dev, _config(network_dim=16), AT_1024)
    lora_params = 16 * DEV_LORA_PER_RANK
    assert estimate.weights == 2 * DEV_PARAMS  # 22.2 GiB
    assert estimate.lora == lora_params * 4 * (1 + 1 + 3)  # fp32 weight, gradient, AdamW m + v + step
    # 57 bf16 block inputs, one double block recomputed with its gradients, embedders: 200 B a row and unit.
    assert estimate.activations == 4608 * 3072 * (2 * 57 + 2 * 42 + 2)
    allocated = 2 * DEV_PARAMS + 20 * lora_params + 4608 * 3072 * 200
    assert estimate.total == _total(allocated)
    assert 27.5 < estimate.total / GIB < 28.5


def test_flux_dev_fp8_base_fits_under_24_gb(dev: TransformerShape) -> None:
    estimate = estimate_memory(dev, _config(network_dim=16, fp8_base=True), AT_1024)
    assert estimate.weights == DEV_FP8_WEIGHTS + 2 * DEV_KEPT  # 14.1 GiB, as the README says
    allocated = estimate.weights + 20 * 16 * DEV_LORA_PER_RANK + 4608 * 3072 * 200
    assert estimate.total == _total(allocated)
    assert estimate.total < 24e9


def test_flux_dev_without_checkpointing_adafactor_full_bf16_batch_2_at_512(dev: TransformerShape) -> None:
    step = StepSize(batch_size=2, image_tokens=1024, text_tokens=512, resolution=(512, 512))
    config = _config(network_dim=4, gradient_checkpointing=False, optimizer="adafactor", full_bf16=True)
    estimate = estimate_memory(dev, config, step)
    lora_params = 4 * DEV_LORA_PER_RANK
    d, r = 3072, 4
    # Adafactor keeps one fp32 row and one column vector per LoRA matrix: 2 r + fan_in + fan_out a target.
    factored = 266 * (2 * r + 2 * d) + 76 * (2 * r + 5 * d) + 38 * (2 * r + 5 * d) + 38 * (2 * r + 6 * d)
    assert estimate.lora == lora_params * 2 * 2 + 4 * factored
    # Every block's saved activations (42 B double, 39 B single) plus one double block's gradients.
    assert estimate.activations == 2 * 1536 * d * (42 * 20 + 39 * 38 + 2)
    assert estimate.total == _total(2 * DEV_PARAMS + estimate.lora + estimate.activations)


def test_an_impossible_run_is_refused_naming_the_options(dev: TransformerShape) -> None:
    config = _config(gradient_checkpointing=False)
    with pytest.raises(InvalidInputError) as caught:
        fit_memory(config, shape=dev, step=AT_1024, available_bytes=24 * GIB)
    message = str(caught.value)
    assert re.search(r"needs about 56\.\d GiB .* the GPU has 24\.0 GiB", message), message
    assert re.search(r"set gradient_checkpointing: true \(saves ~29\.\d GiB\)", message), message
    assert re.search(r"set fp8_base: true \(saves ~8\.\d GiB\)", message), message
    assert "lower the dataset's resolution (1024x1024) or batch_size (1), or network_dim (4)" in message
    assert "memory_preset: auto" in message


@pytest.mark.parametrize(
    ("gib", "chosen"),
    [
        (80, {}),
        (40, {"gradient_checkpointing": True}),
        (24, {"gradient_checkpointing": True, "fp8_base": True}),
        (18.4, {"gradient_checkpointing": True, "fp8_base": True, "optimizer": "adafactor"}),
    ],
)
def test_memory_preset_auto_picks_the_cheapest_settings_that_fit(
    dev: TransformerShape, gib: float, chosen: dict
) -> None:
    config = _config(gradient_checkpointing=False, memory_preset="auto")
    fitted, check = fit_memory(config, shape=dev, step=AT_1024, available_bytes=int(gib * GIB))
    assert fitted.memory_preset_chosen == chosen == check.chosen
    for field, value in chosen.items():
        assert getattr(fitted, field) == value
    assert check.estimate_gib["total"] <= gib and check.available_gib == gib
    again, _ = fit_memory(fitted, shape=dev, step=AT_1024, available_bytes=80 * GIB)
    assert again == fitted  # a choice made once is kept, never made again


def test_memory_preset_auto_refuses_what_no_preset_fits(dev: TransformerShape) -> None:
    config = _config(optimizer="prodigy", memory_preset="auto")
    with pytest.raises(InvalidInputError) as caught:
        fit_memory(config, shape=dev, step=AT_1024, available_bytes=12 * GIB)
    message = str(caught.value)
    # prodigy's learning rate is a multiplier: auto never swaps it for adafactor.
    assert "memory_preset auto already set fp8_base: true, full_bf16: true; lower the dataset's" in message


def test_shapes_come_from_the_header_alone(tiny_models: Path, tmp_path: Path) -> None:
    tiny = TransformerShape.from_config(tiny_transformer_config())
    assert (
        TransformerShape.from_config(transformer_config(tiny_models / "flux1-dev.sft", "flux1-dev.sft"))
        == tiny
    )
    model = FluxTransformer2DModel(**tiny_transformer_config())
    assert sum(tiny.parameter_counts()) == sum(p.numel() for p in model.parameters())
    toml = tmp_path / "two.toml"
    toml.write_text(
        '[[datasets]]\nresolution = 64\nbatch_size = 4\n[[datasets.subsets]]\nimage_dir = "a"\n'
        '[[datasets]]\nresolution = [128, 96]\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = "b"\n'
    )
    config = _config(models_root=tiny_models, dataset_config=toml, cache_dir=tmp_path)
    assert check_run_memory(config, available_bytes=None) == (config, None)  # no CUDA: nothing refused
    with pytest.raises(InvalidInputError, match=r"resolution \(64x64\) or batch_size \(4\)"):
        check_run_memory(config, available_bytes=GIB // 2)
    _, check = check_run_memory(config, available_bytes=GIB)
    step = StepSize(batch_size=4, image_tokens=16, text_tokens=512, resolution=(64, 64))
    assert check is not None and check.estimate_gib == estimate_memory(tiny, config, step).gib()


def test_run_json_keeps_the_choice_strictly(tmp_path: Path) -> None:
    fields = {
        "dataset_config": str(tmp_path / "d.toml"),
        "models_root": str(tmp_path),
        "cache_dir": str(tmp_path),
    }
    path = tmp_path / "run.json"
    chosen = {"gradient_checkpointing": True, "optimizer": "adafactor"}
    path.write_text(_config(**fields, memory_preset="auto", memory_preset_chosen=chosen).model_dump_json())
    assert load_config(path).memory_preset_chosen == chosen


def test_the_trainer_judges_its_gpu_before_loading_and_reports_the_choice(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run", models=tiny_models, toml=toml, cache=tmp_path / "cache", memory_preset="auto"
    )
    trainer = Trainer(run, load_config(run / "run.json"), stop=StopFlag())
    assert trainer.memory is None  # the CPU: nothing judged, nothing refused
    tiny = TransformerShape.from_config(tiny_transformer_config())
    step = StepSize(batch_size=1, image_tokens=16, text_tokens=512, resolution=(64, 64))
    needed = estimate_memory(tiny, trainer.config.model_copy(update={"gradient_checkpointing": True}), step)
    trainer.device = torch.device("cuda")  # what check_memory reads; no CUDA call is made but the patched one
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: needed.total)
    config, check = trainer.check_memory(trainer.config)
    assert (
        config.gradient_checkpointing
        and check is not None
        and check.chosen == {"gradient_checkpointing": True}
    )
    monkeypatch.setattr(memory, "free_device_bytes", lambda device: needed.total // 2)
    with pytest.raises(
        InvalidInputError, match="memory_preset auto already set gradient_checkpointing: true"
    ):
        trainer.check_memory(trainer.config)
    trainer.device, trainer.memory = torch.device("cpu"), check
    trainer.set_up()
    started = next(e for e in read_events(run / "events.jsonl") if e["event"] == "started")
    assert started["memory"] == check.model_dump()


def test_an_edit_pair_dataset_counts_its_reference_tokens(tmp_path: Path) -> None:
    toml = helpers.make_dataset(tmp_path / "data", size=128)
    plain = memory.step_size(toml, guidance=True)
    control = tmp_path / "data" / "images" / "control"
    control.mkdir()
    toml.write_text(
        toml.read_text(encoding="utf-8") + f'  control_directory = "{control}"\n', encoding="utf-8"
    )
    paired = memory.step_size(toml, guidance=True)
    assert paired.image_tokens == 2 * plain.image_tokens == 2 * 64
    assert paired.text_tokens == plain.text_tokens
    for name in ("a.jpg", "b_0.jpg", "b_1.jpg", "b_2.jpg", "orphan_0.jpg"):
        shutil.copy(tmp_path / "data" / "images" / "a.jpg", control / name)
    widest = memory.step_size(toml, guidance=True)
    assert widest.image_tokens == (1 + 3) * plain.image_tokens  # b's three references, not a's one


@pytest.mark.parametrize("family", sorted(FLUX2))
def test_flux2_parameter_and_lora_counts_match_the_real_architecture(family: str) -> None:
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        model = Flux2Transformer2DModel(**_flux2_config(family))
    float8, lora_fans, lora_modules = 0, 0, 0
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and not any(part in name for part in KEPT_IN_COMPUTE_DTYPE):
            float8 += module.weight.numel()
            assert module.bias is None
        if re.fullmatch(KLEIN_TARGETS, name):
            lora_fans += module.in_features + module.out_features
            lora_modules += 1
    total = sum(p.numel() for p in model.parameters())
    params, fp8_weights, per_rank, modules = FLUX2[family]
    assert (total, float8, lora_fans, lora_modules) == (params, fp8_weights, per_rank, modules)
    shape = memory.family_shape(family, model.config)  # type: ignore[arg-type]
    assert isinstance(shape, Flux2Shape) and shape.text_tokens == 512
    weights, biases, kept = shape.parameter_counts()
    assert (weights, biases, weights + kept) == (fp8_weights, 0, params)
    targets = shape.lora_targets()
    assert sum(count * (i + o) for i, o, count in targets) == per_rank
    assert sum(count for _, _, count in targets) == modules


def test_klein_4b_fp8_base_with_checkpointing_at_1024_fits_under_12_gb() -> None:
    shape = memory.family_shape("flux2-klein-4b", {**_flux2_config("flux2-klein-4b"), "in_channels": 128})
    params, fp8_weights, per_rank, _ = FLUX2["flux2-klein-4b"]
    estimate = estimate_memory(shape, _config(network_dim=16, fp8_base=True), AT_1024)
    assert estimate.weights == fp8_weights + 2 * (params - fp8_weights)  # 3.6 GiB
    assert estimate.lora == 16 * per_rank * 4 * (1 + 1 + 3)
    # 25 bf16 block inputs, one single block (51 B, the larger) recomputed with its gradients, embedders.
    assert estimate.activations == 4608 * 3072 * (2 * 25 + 2 * 51 + 2)
    assert estimate.total == _total(estimate.weights + estimate.lora + estimate.activations)
    assert 7.4e9 < estimate.total < 12e9  # the target for klein 4B at 1024 with fp8_base


def test_klein_9b_bf16_without_checkpointing_at_1024() -> None:
    shape = memory.family_shape("flux2-klein-9b", {**_flux2_config("flux2-klein-9b"), "in_channels": 128})
    params, _, per_rank, _ = FLUX2["flux2-klein-9b"]
    estimate = estimate_memory(shape, _config(network_dim=16, gradient_checkpointing=False), AT_1024)
    assert estimate.weights == 2 * params
    # Every block's saved activations (47 B double, 51 B single) and the largest block's gradients.
    assert estimate.activations == 4608 * 4096 * (47 * 8 + 51 * 24 + 51 + 2)
    assert estimate.total == _total(2 * params + 20 * 16 * per_rank + estimate.activations)


def test_a_klein_run_is_judged_from_its_bfl_header(tiny_flux2_models: Path, tmp_path: Path) -> None:
    from diffusers import Flux2Transformer2DModel

    tiny = Flux2Shape.from_config(tiny_flux2_transformer_config())
    path = tiny_flux2_models / "flux-2-klein-4b.safetensors"
    assert memory.transformer_shape(path, path.name) == tiny
    model = Flux2Transformer2DModel(**tiny_flux2_transformer_config())
    assert sum(tiny.parameter_counts()) == sum(p.numel() for p in model.parameters())
    toml = helpers.make_dataset(tmp_path / "data", size=128)
    config = _config(
        models_root=tiny_flux2_models,
        dataset_config=toml,
        cache_dir=tmp_path,
        pretrained_model=path.name,
    )
    with pytest.raises(InvalidInputError, match=r"resolution \(128x128\) or batch_size \(1\)"):
        check_run_memory(config, available_bytes=GIB // 2)
    _, check = check_run_memory(config, available_bytes=GIB)
    step = StepSize(batch_size=1, image_tokens=64, text_tokens=512, resolution=(128, 128))
    assert check is not None and check.estimate_gib == estimate_memory(tiny, config, step).gib()


def test_a_klein_file_in_diffusers_layout_is_judged_as_its_bfl_twin(
    tiny_flux2_models: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from fluxtrain.training.convert_flux2 import bfl_to_diffusers_flux2

    bfl = tiny_flux2_models / "flux-2-klein-4b.safetensors"
    twin = tmp_path / "klein-diffusers.safetensors"
    save_file(bfl_to_diffusers_flux2(load_file(bfl)), twin)
    assert memory.transformer_shape(twin, twin.name) == memory.transformer_shape(bfl, bfl.name)
    toml = helpers.make_dataset(tmp_path / "data", size=128)
    config = _config(
        models_root=tmp_path, dataset_config=toml, cache_dir=tmp_path, pretrained_model=twin.name
    )
    with pytest.raises(InvalidInputError, match=r"resolution \(128x128\) or batch_size \(1\)"):
        check_run_memory(config, available_bytes=GIB // 2)


def test_a_flux2_file_whose_config_cannot_be_read_is_named(tiny_flux2_models: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(tiny_flux2_models / "flux-2-klein-4b.safetensors")
    del sd["single_blocks.0.norm.query_norm.scale"]
    broken = tmp_path / "broken.safetensors"
    save_file(sd, broken)
    with pytest.raises(InvalidInputError, match=r"pretrained_model: 'broken.safetensors' .*query_norm"):
        memory.transformer_shape(broken, broken.name)
