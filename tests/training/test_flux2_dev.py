"""FLUX.2 [dev] on the tiny dev files: features and latents equal `Flux2Pipeline`'s own, the Mistral
text encoder loads from each layout, and a run learns, resumes exactly and loads into the pipeline;
so do edit-pair runs with one and two references, whose samples are `Flux2Pipeline(image=[...])`'s."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as PIPELINE_SYSTEM_MESSAGE
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Mistral3ForConditionalGeneration

from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.rundir import read_events
from fluxtrain.training.cache import image_tensor
from fluxtrain.training.config import load_config
from fluxtrain.training.data import load_training_data
from fluxtrain.training.families import flux2
from fluxtrain.training.families.detect import detect_from_config, released_flux2_config
from fluxtrain.training.families.family import family_for
from fluxtrain.training.families.flux2_dev import (
    SYSTEM_MESSAGE,
    encode_dev_text,
    load_mistral,
    load_mistral_tokenizer,
)
from fluxtrain.training.families.klein import load_flux2_autoencoder, load_flux2_transformer
from fluxtrain.training.families.mistral_files import DEEPEST_TEXT_LAYER, check_mistral_text_encoder
from fluxtrain.training.tiny_flux2_dev import TINY_MISTRAL_HIDDEN, tiny_mistral3_config
from fluxtrain.training.trainer import StopFlag, Trainer
from fluxtrain.training.validation import ValidationLoss
from tests.training import helpers_runs as helpers
from tests.training.helpers_flux2 import make_edit_pairs

DEV_FILES = {
    "pretrained_model": "flux2-dev.safetensors",
    "ae": "flux2-vae.safetensors",
    "text_encoder": "mistral_3_small_flux2_bf16.safetensors",
}
PROMPTS = ["a photo of a dog", "a cat and a dog in the snow, cinematic light"]


def _mistral3(models: Path) -> Mistral3ForConditionalGeneration:
    """The pipeline's text encoder class holding the tiny file's language model (its untouched
    vision tower is never run on text)."""
    tokenizer = load_mistral_tokenizer(models / "tokenizers" / "mistral3")
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config(len(tokenizer)))
    language = {
        f"model.language_model.{k.removeprefix('model.')}": v.float()
        for k, v in load_file(models / DEV_FILES["text_encoder"]).items()
    }
    result = model.load_state_dict(language, strict=False)
    assert not result.unexpected_keys
    assert all(
        k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "lm_head."))
        for k in result.missing_keys
    )
    return model.eval()


def _pipeline(dev_models: Path) -> Flux2Pipeline:
    """The diffusers FLUX.2 [dev] pipeline assembled from the tiny files through our converters."""
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"
        ),
        vae=load_flux2_autoencoder(dev_models / DEV_FILES["ae"], dtype=torch.float32, device="cpu"),
        text_encoder=_mistral3(dev_models),
        tokenizer=load_mistral_tokenizer(dev_models / "tokenizers" / "mistral3"),
        transformer=load_flux2_transformer(dev_models / DEV_FILES["pretrained_model"], dtype=torch.float32),
    )


@pytest.fixture(scope="module")
def pipeline(dev_models: Path) -> Flux2Pipeline:
    return _pipeline(dev_models)


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
    _mistral3(dev_models).save_pretrained(folder, max_shard_size="200KB")
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
    pipe = _pipeline(dev_base)
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


EDIT_PROMPT = f"{helpers.TRIGGER}, red and blue stripes"


def _references(root: Path) -> list[Image.Image]:
    """Two references of different shapes (64x64 and 96x64), as a dataset's control/ holds them."""
    make_edit_pairs(root, references=2)
    first, second = sorted((root / "images" / "control").glob("a_*.jpg"))
    with Image.open(second) as image:
        image.resize((96, 64)).save(root / "wide.png")
    return [Image.open(first).convert("RGB"), Image.open(root / "wide.png").convert("RGB")]


def test_dev_samples_with_references_are_the_pipelines_edit(pipeline: Flux2Pipeline, tmp_path: Path) -> None:
    """`Flux2Dev.generate` with two references is `Flux2Pipeline(image=[...])` to the pixel, with
    its guidance; without them it is another picture."""
    images = _references(tmp_path)
    paths = [tmp_path / "images" / "control" / "a_0.jpg", tmp_path / "wide.png"]
    with torch.no_grad():
        embeds, _ = pipeline.encode_prompt([EDIT_PROMPT], device=torch.device("cpu"))
    expected = pipeline(
        image=images,
        prompt_embeds=embeds,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    family = family_for("flux2-dev")
    latents = [
        family.encode_latents(pipeline.vae, image_tensor(path, image.size, flip=False)[None])
        for path, image in zip(paths, images, strict=True)
    ]

    def render(reference: Any) -> np.ndarray:
        image = family.generate(
            pipeline.transformer,
            pipeline.vae,
            text={"hidden": embeds},
            width=64,
            height=64,
            steps=2,
            guidance_scale=4.0,
            seed=7,
            device=torch.device("cpu"),
            dtype=torch.float32,
            reference=reference,
        )
        return np.asarray(image, dtype=np.float32) / 255

    ours = render(latents)
    assert np.abs(ours - expected).max() <= 1.5 / 255
    assert np.abs(render(None) - ours).max() > 1e-3


def _edit_run(root: Path, models: Path, cache: Path, *, references: int, **fields: Any) -> Path:
    toml = make_edit_pairs(root / "data", references=references)
    return helpers.make_run(root / "run", models=models, toml=toml, cache=cache, **DEV_FILES, **fields)


def _fixed_losses(run: Path) -> tuple[float, float]:
    """(base model, trained LoRA) on the run's own pairs with the run's guidance, as the trainer's
    validation measures held-out images: fixed noise and timesteps (`training/validation.py`)."""
    config = load_config(run / "run.json")
    family = family_for("flux2-dev")
    files = family.resolve_files(config, config.models_root)
    data = load_training_data(config.dataset_config)
    measure = ValidationLoss(data, family.open_cache(config.cache_dir, files, config), seed=0, family=family)
    transformer = load_flux2_transformer(files.transformer, dtype=torch.float32)
    transformer.load_lora_adapter(
        str(run / "output" / "tiny.safetensors"), adapter_name="edit", prefix="transformer"
    )
    losses = [
        measure.measure(
            transformer,
            base=base,
            guidance=config.guidance_scale,
            dtype=torch.float32,
            autocast=contextlib.nullcontext,
        ).loss
        for base in (True, False)
    ]
    return losses[0], losses[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-reference", "two-references"])
def dev_edit_run(
    request: pytest.FixtureRequest, dev_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Two 64 px targets with one or two 64 px references each, trained STEPS steps on the
    pretrained tiny base and measured before and after on themselves."""
    references = request.param
    root = tmp_path_factory.mktemp(f"dev-edit-{references}")
    run = _edit_run(
        root,
        dev_base,
        root / "cache",
        references=references,
        max_train_steps=STEPS,
        learning_rate=1e-2,
        network_dim=8,
        network_alpha=8.0,
        sample_prompts=[EDIT_PROMPT],
        sample_every_n_steps=STEPS,
        sample_steps=2,
    )
    return {"root": root, "run": run, "references": references, "outcome": _train(run)}


def test_dev_edit_loss_falls_on_its_pairs_and_samples(dev_edit_run: dict[str, Any]) -> None:
    assert dev_edit_run["outcome"] == "finished"
    run: Path = dev_edit_run["run"]
    assert load_config(run / "run.json").model_family is None
    assert [e["step"] for e in helpers.step_events(run)] == list(range(1, STEPS + 1))
    base, trained = _fixed_losses(run)
    assert trained < 0.5 * base, (base, trained)
    caching = next(e for e in read_events(run / "events.jsonl") if e["event"] == "caching")
    assert caching["latents_encoded"] == 2 + 2 * dev_edit_run["references"]  # targets and their controls
    samples = [e for e in read_events(run / "events.jsonl") if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [STEPS] and Path(samples[0]["path"]).is_file()


def test_dev_edit_lora_loads_into_flux2_pipeline_and_changes_its_edit(
    dev_edit_run: dict[str, Any], dev_base: Path
) -> None:
    pipe = _pipeline(dev_base)
    folder = dev_edit_run["run"].parent / "data" / "images" / "control"
    references = sorted(folder.glob("a*.jpg"))
    assert len(references) == dev_edit_run["references"]
    images = [Image.open(path).convert("RGB") for path in references]

    def render() -> np.ndarray:
        return pipe(
            image=images,
            prompt=EDIT_PROMPT,
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).images[0]

    before = render()
    lora = dev_edit_run["run"] / "output" / "tiny.safetensors"
    with safe_open(str(lora), framework="pt") as handle:
        file_keys = {k.removeprefix("transformer.") for k in handle.keys()}  # noqa: SIM118
    pipe.load_lora_weights(str(lora), adapter_name="edit")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="edit")
    assert set(loaded) == file_keys
    assert np.abs(render() - before).max() > 1e-3


def test_dev_edit_resume_continues_with_identical_losses(
    dev_edit_run: dict[str, Any], dev_models: Path, tmp_path: Path
) -> None:
    cache = dev_edit_run["root"] / "cache"
    references = dev_edit_run["references"]
    fields = {"max_train_steps": 6, "learning_rate": 1e-2}
    whole = _edit_run(tmp_path / "whole", dev_models, cache, references=references, **fields)
    assert _train(whole) == "finished"
    split = _edit_run(tmp_path / "split", dev_models, cache, references=references, **fields)
    assert _train(split, stop_after=3) == "interrupted"
    assert _train(split) == "finished"
    expected = {e["step"]: e["loss"] for e in helpers.step_events(whole)}
    resumed = helpers.step_events(split)[3:]
    assert [e["step"] for e in resumed] == [4, 5, 6]
    assert all(e["loss"] == expected[e["step"]] for e in resumed)
