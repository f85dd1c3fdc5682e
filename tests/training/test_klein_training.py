"""FLUX.2 [klein] through the family seam, in-process on the tiny klein files: it learns, resumes
exactly, caches once, and its LoRA loads into Flux2KleinPipeline and changes the image."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from fluxtrain.rundir import read_events
from fluxtrain.training.config import load_config
from fluxtrain.training.families.klein import (
    load_flux2_autoencoder,
    load_flux2_transformer,
    load_qwen3,
    load_qwen3_tokenizer,
)
from fluxtrain.training.trainer import StopFlag, Trainer
from fluxtrain.training.validation import ValidationLoss
from tests.training import helpers_runs as helpers

KLEIN_FILES = {
    "pretrained_model": "flux-2-klein-4b.safetensors",
    "ae": "flux2-vae.safetensors",
    "text_encoder": "qwen_3_4b.safetensors",
}
OVERFIT_STEPS = 160


def _train(run_dir: Path, *, stop_after: int | None = None) -> str:
    trainer = Trainer(run_dir, load_config(run_dir / "run.json"), stop=StopFlag())
    if stop_after is not None:
        trainer.stop_requested = lambda: trainer.counter.step >= stop_after  # type: ignore[method-assign]
    return trainer.run()


def _klein_run(root: Path, models: Path, cache: Path, **fields: Any) -> Path:
    toml = helpers.make_dataset(root / "data", size=64)
    return helpers.make_run(root / "run", models=models, toml=toml, cache=cache, **KLEIN_FILES, **fields)


@pytest.fixture(scope="module")
def overfit(klein_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two 64 px images (16 tokens each) trained OVERFIT_STEPS steps on the pretrained base; the cache
    is shared with later runs. The loss is also taken on a fixed evaluation (the validation loss's
    timesteps and noise, on the training images) of the base model and of the trained LoRA."""
    root = tmp_path_factory.mktemp("klein")
    run = _klein_run(
        root,
        klein_base,
        root / "cache",
        max_train_steps=OVERFIT_STEPS,
        learning_rate=1e-2,
        network_dim=8,
        network_alpha=8.0,
        sample_prompts=["zqx, a green disc"],
        sample_every_n_steps=OVERFIT_STEPS,
        sample_steps=2,
    )
    trainer = Trainer(run, load_config(run / "run.json"), stop=StopFlag())
    setup = trainer.set_up()
    outcome = trainer.train(setup)
    trainer.report.close()
    evaluation = ValidationLoss(setup.data, setup.cache, seed=0, family=setup.family)
    measured = {
        name: evaluation.measure(
            setup.transformer,
            base=base,
            guidance=None,
            dtype=trainer.precision.compute,
            autocast=trainer.accelerator.autocast,
        ).loss
        for name, base in (("base", True), ("trained", False))
    }
    return {"root": root, "run": run, "outcome": outcome, **measured}


def test_klein_run_overfits_with_flux2_shift_and_samples(overfit: dict[str, Any]) -> None:
    assert overfit["outcome"] == "finished"
    run: Path = overfit["run"]
    steps = helpers.step_events(run)
    assert [e["step"] for e in steps] == list(range(1, OVERFIT_STEPS + 1))
    assert overfit["trained"] < 0.5 * overfit["base"], (overfit["base"], overfit["trained"])
    start = statistics.mean(e["loss"] for e in steps[:5])
    end = statistics.mean(e["loss"] for e in steps[-10:])
    assert end < 0.5 * start, (start, end)
    samples = [e for e in read_events(run / "events.jsonl") if e["event"] == "sample"]
    assert len(samples) == 1 and Path(samples[0]["path"]).is_file()
    with safe_open(str(run / "output" / "tiny.safetensors"), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["modelspec.architecture"] == "flux-2-klein-4b/lora"
    assert metadata["ss_base_model_version"] == "flux2"
    assert any("to_qkv_mlp_proj" in k for k in keys) and not any("modulation" in k for k in keys)


def test_second_klein_run_encodes_nothing_and_writes_bfl_and_kohya(
    overfit: dict[str, Any], tiny_flux2_models: Path, tmp_path: Path
) -> None:
    cache = overfit["root"] / "cache"
    for save_format, marker in (
        ("bfl", "diffusion_model.single_blocks.0.linear1.lora_A.weight"),
        ("kohya", "lora_unet_double_blocks_0_img_attn_qkv.alpha"),
    ):
        run = _klein_run(
            tmp_path / save_format, tiny_flux2_models, cache, max_train_steps=2, save_format=save_format
        )
        assert _train(run) == "finished"
        caching = next(e for e in read_events(run / "events.jsonl") if e["event"] == "caching")
        assert caching["latents_encoded"] == 0 and caching["texts_encoded"] == 0, caching
        with safe_open(str(run / "output" / "tiny.safetensors"), framework="pt") as handle:
            assert marker in handle.keys()  # noqa: SIM118


def test_klein_resume_continues_with_identical_losses(
    overfit: dict[str, Any], tiny_flux2_models: Path, tmp_path: Path
) -> None:
    cache = overfit["root"] / "cache"
    whole = _klein_run(tmp_path / "whole", tiny_flux2_models, cache, max_train_steps=6, learning_rate=1e-2)
    assert _train(whole) == "finished"
    split = _klein_run(tmp_path / "split", tiny_flux2_models, cache, max_train_steps=6, learning_rate=1e-2)
    assert _train(split, stop_after=3) == "interrupted"
    assert _train(split) == "finished"
    expected = {e["step"]: e["loss"] for e in helpers.step_events(whole)}
    resumed = helpers.step_events(split)[3:]
    assert [e["step"] for e in resumed] == [4, 5, 6]
    assert all(e["loss"] == expected[e["step"]] for e in resumed)


def _pipeline(models: Path) -> Flux2KleinPipeline:
    files = {field: models / name for field, name in KLEIN_FILES.items()}
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=load_flux2_autoencoder(files["ae"], dtype=torch.float32, device="cpu"),
        text_encoder=load_qwen3(files["text_encoder"], dtype=torch.float32, device="cpu"),
        tokenizer=load_qwen3_tokenizer(models / "tokenizers" / "qwen3"),
        transformer=load_flux2_transformer(files["pretrained_model"], dtype=torch.float32),
    )


def _render(pipe: Flux2KleinPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompt="zqx, a green disc",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=generator,
        output_type="np",
    ).images[0]


def test_klein_lora_loads_into_flux2_klein_pipeline_and_changes_it(
    overfit: dict[str, Any], klein_base: Path
) -> None:
    pipe = _pipeline(klein_base)
    before = _render(pipe)
    lora = overfit["run"] / "output" / "tiny.safetensors"
    with safe_open(str(lora), framework="pt") as handle:
        file_keys = {k.removeprefix("transformer.") for k in handle.keys()}  # noqa: SIM118
    pipe.load_lora_weights(str(lora), adapter_name="tiny")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="tiny")
    assert (
        set(loaded) == {k.replace(".weight", ".tiny.weight") for k in file_keys} or set(loaded) == file_keys
    )
    after = _render(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_flux2_shift_is_the_pipelines_mu_and_needs_the_token_count() -> None:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from fluxtrain.training import flow

    for tokens in (4, 1024, 4096, 4301, 16384):
        assert flow.flux2_mu(tokens, 50) == pytest.approx(compute_empirical_mu(tokens, 50), abs=1e-9)
    draw = {
        tokens: flow.sample_timesteps(
            4096,
            method="flux2_shift",
            shift=1.0,
            sigmoid_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            image_tokens=tokens,
        )
        for tokens in (256, 4096)
    }
    assert draw[256].min() > 0 and draw[4096].max() < 1
    assert draw[4096].mean() > draw[256].mean() > 0.5  # larger images are pushed further towards noise
    with pytest.raises(ValueError, match="token count"):
        flow.sample_timesteps(
            1, method="flux2_shift", shift=1.0, sigmoid_scale=1.0, generator=torch.Generator()
        )


def test_missing_qwen3_tokenizer_folder_is_named(tmp_path: Path) -> None:
    from fluxtrain.errors import NotFoundError

    with pytest.raises(NotFoundError, match=f"Qwen3 tokenizer folder {tmp_path / 'qwen3'} is missing"):
        load_qwen3_tokenizer(tmp_path / "qwen3")
