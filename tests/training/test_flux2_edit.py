"""FLUX.2 edit LoRAs, [klein] and [dev], on their tiny files: reference tokens and ids equal the
pipelines' own, samples are `Flux2KleinPipeline` / `Flux2Pipeline(image=[...])`'s ([dev] with its
guidance), edit pairs with one and with two references halve a fixed-evaluation loss (on a briefly
pretrained tiny base), the LoRA drives the pipeline called with the reference images, and resume is
exact."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open

from fluxtrain.rundir import read_events
from fluxtrain.training.cache import image_tensor
from fluxtrain.training.config import load_config
from fluxtrain.training.data import load_training_data
from fluxtrain.training.families import flux2
from fluxtrain.training.families.detect import ModelFamily
from fluxtrain.training.families.family import family_for
from fluxtrain.training.families.klein import Klein, load_flux2_transformer, reference_tokens
from fluxtrain.training.trainer import StopFlag, Trainer
from fluxtrain.training.validation import ValidationLoss
from tests.training import helpers_runs as helpers
from tests.training.helpers_flux2 import dev_pipeline, klein_pipeline, make_edit_pairs, run_files


@dataclass(frozen=True)
class EditFamily:
    """A FLUX.2 family as these tests train it: its tiny files (the fixtures holding the random and
    the pretrained ones), its diffusers pipeline, and the guidance its samples are checked at."""

    name: ModelFamily
    models: str
    base: str
    pipeline: Callable[[Path], DiffusionPipeline]
    guidance: float

    @property
    def files(self) -> dict[str, str]:
        return run_files(self.name)


FAMILIES = {
    "klein": EditFamily("flux2-klein-4b", "tiny_flux2_models", "klein_base", klein_pipeline, 1.0),
    "dev": EditFamily("flux2-dev", "dev_models", "dev_base", dev_pipeline, 4.0),
}
PROMPT = f"{helpers.TRIGGER}, red and blue stripes"
STEPS = 160
"""LoRA steps on the pretrained tiny base (`helpers_flux2`), the base model's fixed-evaluation loss
and the LoRA's, with one reference / two: klein 2.84 -> 0.72 / 2.85 -> 0.72 (0.25), [dev]
2.58 -> 0.67 / 2.58 -> 0.69 (0.26-0.27); klein on the random tiny files only 2.36 -> 2.14."""


def _train(run_dir: Path, *, stop_after: int | None = None) -> str:
    trainer = Trainer(run_dir, load_config(run_dir / "run.json"), stop=StopFlag())
    if stop_after is not None:
        trainer.stop_requested = lambda: trainer.counter.step >= stop_after  # type: ignore[method-assign]
    return trainer.run()


def _edit_run(
    root: Path, family: EditFamily, models: Path, cache: Path, *, references: int, **fields: Any
) -> Path:
    toml = make_edit_pairs(root / "data", references=references)
    return helpers.make_run(root / "run", models=models, toml=toml, cache=cache, **family.files, **fields)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pipe(request: pytest.FixtureRequest) -> tuple[EditFamily, DiffusionPipeline]:
    """Each family with its pipeline on the random tiny files."""
    family = FAMILIES[request.param]
    return family, family.pipeline(request.getfixturevalue(family.models))


@pytest.fixture(scope="module")
def controls(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two reference files of different shapes (64x64 and 96x64), as a dataset's control/ holds them."""
    root = tmp_path_factory.mktemp("controls")
    helpers.make_dataset(root / "a", size=64)
    helpers.make_dataset(root / "b", size=96)
    first = root / "a" / "images" / "a.jpg"
    second = root / "b" / "images" / "b.jpg"
    with Image.open(second) as image:
        image.crop((0, 16, 96, 80)).save(root / "wide.png")
    return [first, root / "wide.png"]


def test_reference_tokens_and_ids_equal_the_pipelines(
    family_pipe: tuple[EditFamily, DiffusionPipeline], controls: list[Path]
) -> None:
    """The cached path (file -> pixels -> normalised, patchified latent) and `reference_tokens`
    give what `prepare_image_latents` gives for the same images, batch of two, ids 10 and 20."""
    edit, pipe = family_pipe
    family = family_for(edit.name)
    images = [Image.open(path).convert("RGB") for path in controls]
    processed = [
        pipe.image_processor.preprocess(image, height=image.height, width=image.width, resize_mode="crop")
        for image in images
    ]
    expected, expected_ids = pipe.prepare_image_latents(
        images=processed, batch_size=2, generator=None, device="cpu", dtype=torch.float32
    )
    latents = [
        family.encode_latents(pipe.vae, image_tensor(path, image.size, flip=False)[None]).expand(
            2, -1, -1, -1
        )
        for path, image in zip(controls, images, strict=True)
    ]
    tokens, ids = reference_tokens(latents, device="cpu")
    assert tokens.shape == expected.shape == (2, 16 + 24, 128)
    torch.testing.assert_close(tokens, expected, rtol=1e-3, atol=1e-3)  # pixels rounded apart: 1e-4
    assert torch.equal(ids, expected_ids)
    assert ids[0, :16, 0].eq(10).all() and ids[0, 16:, 0].eq(20).all()
    one_tokens, one_ids = reference_tokens(latents[0], device="cpu")
    assert torch.equal(one_tokens, tokens[:, :16]) and torch.equal(one_ids, ids[:, :16])


def test_references_follow_the_noisy_tokens_and_are_sliced_off() -> None:
    seen: dict[str, torch.Tensor] = {}

    def model(**inputs: Any) -> tuple[torch.Tensor]:
        seen.update(inputs)
        return (inputs["hidden_states"] * 2,)

    noisy = torch.randn(2, 128, 2, 3)
    references = [torch.randn(2, 128, 2, 2), torch.randn(2, 128, 1, 3)]
    text = {"hidden": torch.zeros(2, 5, 12)}
    out = Klein("flux2-klein-4b").predict_velocity(
        model, noisy, torch.ones(2), text, guidance=None, dtype=torch.float32, reference=references
    )
    assert torch.equal(out, flux2.pack(noisy) * 2)
    assert torch.equal(seen["hidden_states"][:, 6:10], flux2.pack(references[0]))
    assert torch.equal(seen["hidden_states"][:, 10:], flux2.pack(references[1]))
    ids = seen["img_ids"]
    assert ids.shape == (2, 13, 4)
    assert ids[:, :6, 0].eq(0).all() and ids[:, 6:10, 0].eq(10).all() and ids[:, 10:, 0].eq(20).all()
    assert torch.equal(ids[0, 6:10, 1:3], flux2.latent_ids(references[0])[0, :, 1:3])


def test_samples_render_as_the_pipeline_does_with_the_references(
    family_pipe: tuple[EditFamily, DiffusionPipeline], controls: list[Path]
) -> None:
    """The family's `generate` with two references is the pipeline's `image=[...]` to the pixel, at
    the family's guidance; without them it is another picture."""
    edit, pipe = family_pipe
    family = family_for(edit.name)
    images = [Image.open(path).convert("RGB") for path in controls]
    with torch.no_grad():
        hidden, _ = pipe.encode_prompt([PROMPT], device=torch.device("cpu"))
    expected = pipe(
        image=images,
        prompt_embeds=hidden,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=edit.guidance,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    latents = [
        family.encode_latents(pipe.vae, image_tensor(path, image.size, flip=False)[None])
        for path, image in zip(controls, images, strict=True)
    ]

    def render(reference: Any) -> np.ndarray:
        image = family.generate(
            pipe.transformer,
            pipe.vae,
            text={"hidden": hidden},
            width=64,
            height=64,
            steps=2,
            guidance_scale=edit.guidance,
            seed=7,
            device=torch.device("cpu"),
            dtype=torch.float32,
            reference=reference,
        )
        return np.asarray(image, dtype=np.float32) / 255

    ours = render(latents)
    assert np.abs(ours - expected).max() <= 1.5 / 255
    assert np.abs(render(None) - ours).max() > 1e-3


def _fixed_losses(run: Path, family_name: ModelFamily) -> tuple[float, float]:
    """(base model, trained LoRA) on the run's own pairs, as the trainer's validation measures held-out
    images: cached latents, references and captions, fixed noise and timesteps (`training/validation.py`),
    with the guidance the trainer gives the family."""
    config = load_config(run / "run.json")
    family = family_for(family_name)
    files = family.resolve_files(config, config.models_root)
    data = load_training_data(config.dataset_config)
    measure = ValidationLoss(data, family.open_cache(config.cache_dir, files, config), seed=0, family=family)
    transformer = load_flux2_transformer(files.transformer, dtype=torch.float32)
    transformer.load_lora_adapter(
        str(run / "output" / "tiny.safetensors"), adapter_name="edit", prefix="transformer"
    )
    guidance = config.guidance_scale if transformer.config.guidance_embeds else None
    losses = [
        measure.measure(
            transformer, base=base, guidance=guidance, dtype=torch.float32, autocast=contextlib.nullcontext
        ).loss
        for base in (True, False)
    ]
    return losses[0], losses[1]


@pytest.fixture(
    scope="module",
    params=[(name, references) for name in FAMILIES for references in (1, 2)],
    ids=lambda param: f"{param[0]}-{param[1]}-reference{'s' if param[1] > 1 else ''}",
)
def edit_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two 64 px targets (16 tokens) with one or two 64 px references each, trained STEPS steps on the
    family's pretrained base and measured before and after on themselves (fixed noise and timesteps:
    `training/validation.py`); the family comes from the file, the request names none."""
    name, references = request.param
    family = FAMILIES[name]
    root = tmp_path_factory.mktemp(f"{name}-edit-{references}")
    run = _edit_run(
        root,
        family,
        request.getfixturevalue(family.base),
        root / "cache",
        references=references,
        max_train_steps=STEPS,
        learning_rate=1e-2,
        network_dim=8,
        network_alpha=8.0,
        sample_prompts=[PROMPT],
        sample_every_n_steps=STEPS,
        sample_steps=2,
    )
    return {"root": root, "run": run, "family": family, "references": references, "outcome": _train(run)}


def test_flux2_edit_loss_falls_on_its_pairs_and_samples(edit_run: dict[str, Any]) -> None:
    assert edit_run["outcome"] == "finished"
    run: Path = edit_run["run"]
    assert [e["step"] for e in helpers.step_events(run)] == list(range(1, STEPS + 1))
    base, trained = _fixed_losses(run, edit_run["family"].name)
    assert trained < 0.5 * base, (base, trained)
    caching = next(e for e in read_events(run / "events.jsonl") if e["event"] == "caching")
    assert caching["latents_encoded"] == 2 + 2 * edit_run["references"]  # targets and their controls
    samples = [e for e in read_events(run / "events.jsonl") if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [STEPS] and Path(samples[0]["path"]).is_file()


def test_flux2_edit_lora_loads_into_the_pipeline_and_changes_its_edit(
    edit_run: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    family: EditFamily = edit_run["family"]
    pipe = family.pipeline(request.getfixturevalue(family.base))
    folder = edit_run["run"].parent / "data" / "images" / "control"
    references = sorted(folder.glob("a*.jpg"))
    assert len(references) == edit_run["references"]
    images = [Image.open(path).convert("RGB") for path in references]

    def render() -> np.ndarray:
        return pipe(
            image=images,
            prompt=PROMPT,
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).images[0]

    before = render()
    lora = edit_run["run"] / "output" / "tiny.safetensors"
    with safe_open(str(lora), framework="pt") as handle:
        file_keys = {k.removeprefix("transformer.") for k in handle.keys()}  # noqa: SIM118
    pipe.load_lora_weights(str(lora), adapter_name="edit")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="edit")
    assert set(loaded) == file_keys
    assert np.abs(render() - before).max() > 1e-3


def test_flux2_edit_resume_continues_with_identical_losses(
    edit_run: dict[str, Any], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    family: EditFamily = edit_run["family"]
    models = request.getfixturevalue(family.models)
    cache = edit_run["root"] / "cache"
    references = edit_run["references"]
    fields = {"max_train_steps": 6, "learning_rate": 1e-2}
    whole = _edit_run(tmp_path / "whole", family, models, cache, references=references, **fields)
    assert _train(whole) == "finished"
    split = _edit_run(tmp_path / "split", family, models, cache, references=references, **fields)
    assert _train(split, stop_after=3) == "interrupted"
    assert _train(split) == "finished"
    expected = {e["step"]: e["loss"] for e in helpers.step_events(whole)}
    resumed = helpers.step_events(split)[3:]
    assert [e["step"] for e in resumed] == [4, 5, 6]
    assert all(e["loss"] == expected[e["step"]] for e in resumed)
