"""FLUX.2 [dev] on the tiny dev files: features and latents equal `Flux2Pipeline`'s own, the Mistral
text encoder loads from each layout, and a run learns, resumes exactly and loads into the pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as PIPELINE_SYSTEM_MESSAGE
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.rundir import read_events
from fluxtrain.training.config import load_config
from fluxtrain.training.families import flux2
from fluxtrain.training.families.detect import detect_from_config, released_flux2_config
from fluxtrain.training.families.family import family_for
from fluxtrain.training.families.flux2_dev import (
    SYSTEM_MESSAGE,
    encode_dev_text,
    load_mistral,
    load_mistral_tokenizer,
)
from fluxtrain.training.families.mistral_files import DEEPEST_TEXT_LAYER, check_mistral_text_encoder
from fluxtrain.training.tiny_flux2_dev import TINY_MISTRAL_HIDDEN
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers
from tests.training.helpers_flux2 import dev_pipeline, mistral3

DEV_FILES = {
    "pretrained_model": "flux2-dev.safetensors",
    "ae": "flux2-vae.safetensors",
    "text_encoder": "mistral_3_small_flux2_bf16.safetensors",
}
PROMPTS = ["a photo of a dog", "a cat and a dog in the snow, cinematic light"]


@pytest.fixture(scope="module")
def pipeline(dev_models: Path) -> Flux2Pipeline:
    return dev_pipeline(dev_models)


def _features(path: Path, models: Path) -> torch.Tensor:
    return encode_dev_text(
        text_encoder=load_mistral(path, dtype=torch.float32, device="cpu"),
        tokenizer=load_mistral_tokenizer(models / "tokenizers" / "mistral3"),
        prompts=PROMPTS,
    )


def test_text_features_and_ids_equal_the_pipelines(pipeline: Flux2Pipeline, dev_models: Path) -> None:
    assert SYSTEM_MESSAGE == PIPELINE_SYSTEM_MESSAGE
    assert max(flux2.TEXT_LAYERS["flux2-dev"]) == DEEPEST_TEXT_LAYER
    with torch.no_grad():
        expected, expected_ids = pipeline.encode_prompt(PROMPTS, device=torch.device("cpu"))
    ours = _features(dev_models / DEV_FILES["text_encoder"], dev_models)
    assert ours.shape == (2, flux2.MAX_TEXT_TOKENS, 3 * TINY_MISTRAL_HIDDEN)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert torch.equal(flux2.text_ids(ours), expected_ids)
    assert not torch.equal(ours[0], ours[1])


def test_latents_and_ids_equal_the_pipelines(pipeline: Flux2Pipeline) -> None:
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        expected = pipeline._encode_vae_image(pixels, generator=None)
    ours = flux2.encode_latents(pipeline.vae, pixels)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    packed, ids = pipeline.prepare_latents(
        batch_size=1,
        num_latents_channels=pipeline.transformer.config.in_channels // 4,
        height=64,
        width=48,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator("cpu").manual_seed(7),
    )
    noise = torch.randn((1, 128, 4, 3), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(flux2.pack(noise), packed)
    assert torch.equal(flux2.latent_ids(noise), ids)


def test_mistral_loads_from_a_shard_folder_a_pruned_file_and_fp8(dev_models: Path, tmp_path: Path) -> None:
    single = _features(dev_models / DEV_FILES["text_encoder"], dev_models)
    folder = tmp_path / "text_encoder"
    mistral3(dev_models).save_pretrained(folder, max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    torch.testing.assert_close(_features(folder, dev_models), single, rtol=1e-5, atol=1e-5)
    sd = load_file(dev_models / DEV_FILES["text_encoder"])
    pruned = {
        k: v
        for k, v in sd.items()
        if k != "model.norm.weight" and not k.startswith(("model.layers.30.", "model.layers.31."))
    }
    save_file(pruned, str(tmp_path / "pruned.safetensors"))
    assert torch.equal(_features(tmp_path / "pruned.safetensors", dev_models), single)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    features = _features(tmp_path / "fp8.safetensors", dev_models)
    assert features.shape == single.shape and not torch.equal(features, single)
    torch.testing.assert_close(features, single, rtol=0.2, atol=0.2)


def test_wrong_text_encoders_and_a_missing_tokenizer_are_named(
    dev_models: Path, tmp_path: Path, tiny_flux2_models: Path
) -> None:
    qwen = tiny_flux2_models / "qwen_3_4b.safetensors"
    with pytest.raises(InvalidInputError, match="'qwen_3_4b.safetensors' is a Qwen3 text encoder .*Mistral"):
        check_mistral_text_encoder(qwen, qwen.name)
    sd = load_file(dev_models / DEV_FILES["text_encoder"])
    shallow = {k: v for k, v in sd.items() if not k.startswith(("model.layers.2", "model.layers.3"))}
    save_file(shallow, str(tmp_path / "shallow.safetensors"))
    with pytest.raises(InvalidInputError, match="'shallow' has 20 Mistral layers; .*needs at least 30"):
        check_mistral_text_encoder(tmp_path / "shallow.safetensors", "shallow")
    with pytest.raises(NotFoundError, match=f"Mistral tokenizer folder {tmp_path / 'mistral3'} is missing"):
        load_mistral_tokenizer(tmp_path / "mistral3")


def _train(run_dir: Path, *, stop_after: int | None = None) -> str:
    trainer = Trainer(run_dir, load_config(run_dir / "run.json"), stop=StopFlag())
    if stop_after is not None:
        trainer.stop_requested = lambda: trainer.counter.step >= stop_after  # type: ignore[method-assign]
    return trainer.run()


def _dev_run(root: Path, models: Path, cache: Path, **fields: Any) -> Path:
    toml = helpers.make_dataset(root / "data", size=64)
    return helpers.make_run(root / "run", models=models, toml=toml, cache=cache, **DEV_FILES, **fields)


STEPS = 160


@pytest.fixture(scope="module")
def overfit(dev_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two 64 px images trained STEPS steps on the pretrained tiny base (`helpers_flux2`); the
    validation loss (fixed t and noise) of the same pictures, saved again, is the fixed evaluation
    taken before and after."""
    root = tmp_path_factory.mktemp("flux2_dev")
    toml = helpers.make_dataset(root / "data", size=64)
    held = helpers.make_dataset(root / "held", size=64)
    for image in (root / "held" / "images").glob("*.jpg"):
        Image.open(image).save(image, quality=90)  # the training pictures under another sha256
    run = helpers.make_run(
        root / "run",
        models=dev_base,
        toml=toml,
        cache=root / "cache",
        **DEV_FILES,
        max_train_steps=STEPS,
        learning_rate=1e-2,
        network_dim=8,
        network_alpha=8.0,
        validation_dataset_config=str(held),
        validation_every_n_steps=STEPS,
        sample_prompts=["zqx, a green disc"],
        sample_every_n_steps=STEPS,
        sample_steps=2,
    )
    return {"root": root, "run": run, "outcome": _train(run)}


def test_dev_run_learns_with_flux2_shift_and_guidance(overfit: dict[str, Any]) -> None:
    assert overfit["outcome"] == "finished"
    run: Path = overfit["run"]
    events = read_events(run / "events.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    validation = {e["step"]: e["loss"] for e in events if e["event"] == "validation"}
    assert validation[STEPS] < 0.5 * validation[0], validation  # measured 2.68 -> 0.87 (0.32)
    samples = [e for e in events if e["event"] == "sample"]
    assert len(samples) == 1 and Path(samples[0]["path"]).is_file()
    with safe_open(str(run / "output" / "tiny.safetensors"), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["modelspec.architecture"] == "flux-2-dev/lora"
    assert any("to_qkv_mlp_proj" in k for k in keys) and not any(
        "modulation" in k or "guidance" in k for k in keys
    )
    family = family_for("flux2-dev")
    assert family.timestep_sampling == "flux2_shift"


def test_dev_resume_continues_with_identical_losses(
    overfit: dict[str, Any], dev_models: Path, tmp_path: Path
) -> None:
    cache = overfit["root"] / "cache"
    whole = _dev_run(tmp_path / "whole", dev_models, cache, max_train_steps=6, learning_rate=1e-2)
    assert _train(whole) == "finished"
    caching = next(e for e in read_events(whole / "events.jsonl") if e["event"] == "caching")
    assert caching["latents_encoded"] == 0 and caching["texts_encoded"] == 0, caching
    split = _dev_run(tmp_path / "split", dev_models, cache, max_train_steps=6, learning_rate=1e-2)
    assert _train(split, stop_after=3) == "interrupted"
    assert _train(split) == "finished"
    expected = {e["step"]: e["loss"] for e in helpers.step_events(whole)}
    resumed = helpers.step_events(split)[3:]
    assert [e["step"] for e in resumed] == [4, 5, 6]
    assert all(e["loss"] == expected[e["step"]] for e in resumed)


def _render(pipe: Flux2Pipeline) -> np.ndarray:
    return pipe(
        prompt="zqx, a green disc",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_dev_lora_loads_into_flux2_pipeline_and_changes_it(overfit: dict[str, Any], dev_base: Path) -> None:
    pipe = dev_pipeline(dev_base)
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


def test_the_full_size_dev_config_is_detected_as_released_dev() -> None:
    config = {"_class_name": "Flux2Transformer2DModel", **released_flux2_config("flux2-dev")}
    assert detect_from_config(config).family == "flux2-dev" and detect_from_config(config).full_size
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**released_flux2_config("flux2-dev"))
    assert 31e9 < sum(p.numel() for p in model.parameters()) < 33e9  # FLUX.2 [dev] is a 32B transformer


def test_dev_samples_are_the_pipelines_image(pipeline: Flux2Pipeline) -> None:
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt(["zqx, a green disc"], device=torch.device("cpu"))
    expected = pipeline(
        prompt_embeds=embeds,
        height=64,
        width=48,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images[0]
    ours = family_for("flux2-dev").generate(
        pipeline.transformer,
        pipeline.vae,
        text={"hidden": embeds},
        width=48,
        height=64,
        steps=3,
        guidance_scale=4.0,
        seed=5,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    assert np.abs(np.asarray(ours, dtype=np.float32) / 255 - expected).max() <= 1 / 255
    other = family_for("flux2-dev").generate(
        pipeline.transformer,
        pipeline.vae,
        text={"hidden": embeds},
        width=48,
        height=64,
        steps=3,
        guidance_scale=1.0,
        seed=5,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    assert np.asarray(other).tolist() != np.asarray(ours).tolist()  # the guidance constant reaches the model
