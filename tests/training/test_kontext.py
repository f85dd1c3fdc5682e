"""FLUX.1 Kontext on tiny models: edit pairs overfit, the LoRA drives FluxKontextPipeline, resume is exact."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file

from fluxtrain.errors import InvalidInputError
from fluxtrain.training import flow
from fluxtrain.training.config import load_config
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers

STEPS = 160


class StopAfter:
    """A stop request once `step` is trained (read between steps, as SIGTERM's flag is)."""

    def __init__(self, run: Path, step: int) -> None:
        self.run, self.step = run, step

    @property
    def requested(self) -> bool:
        return any(e["step"] >= self.step for e in helpers.step_events(self.run))


def _train(run: Path, stop: Any = None) -> str:
    return Trainer(run, load_config(run / "run.json"), stop=stop or StopFlag()).run()


def make_pairs(root: Path, *, size: int = 64) -> Path:
    """The two-image dataset as targets, each with its colour-inverted, mirrored source in control/."""
    toml = helpers.make_dataset(root, size=size)
    control = root / "images" / "control"
    control.mkdir()
    for name in ("a.jpg", "b.jpg"):
        with Image.open(root / "images" / name) as image:
            ImageOps.mirror(ImageOps.invert(image.convert("RGB"))).save(control / name, quality=95)
    toml.write_text(
        toml.read_text(encoding="utf-8") + f'  control_directory = "{control}"\n', encoding="utf-8"
    )
    return toml


@pytest.fixture(scope="module")
def kontext_run(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kontext")
    models = helpers.write_wide_models(tiny_models, root / "models", guidance=True)
    # 128 px: 64 target and 64 reference tokens (the FLUX.1 overfit test's size).
    toml = make_pairs(root / "data", size=128)
    run = helpers.make_run(
        root / "run",
        models=models,
        toml=toml,
        cache=root / "cache",
        max_train_steps=STEPS,
        learning_rate=1e-2,
        network_dim=16,
        network_alpha=16.0,
        sample_prompts=[f"{helpers.TRIGGER}, red and blue stripes"],
        sample_every_n_epochs=1000,
        sample_steps=2,
    )
    return {"root": root, "models": models, "toml": toml, "run": run, "outcome": _train(run)}


def test_reference_tokens_follow_the_noisy_ones_with_first_id_one_and_are_sliced_off() -> None:
    seen: dict[str, torch.Tensor] = {}

    def model(**inputs: Any) -> tuple[torch.Tensor]:
        seen.update(inputs)
        return (inputs["hidden_states"] * 2,)

    noisy, reference = torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 6)
    out = flow.predict_velocity(
        model,
        noisy,
        torch.ones(1),
        torch.zeros(1, 3, 8),
        torch.zeros(1, 8),
        guidance=None,
        dtype=torch.float32,
        reference=reference,
    )
    assert torch.equal(out, flow.pack_latents(noisy) * 2)
    assert torch.equal(seen["hidden_states"][:, 6:], flow.pack_latents(reference))
    ids = seen["img_ids"]
    assert ids.shape == (12, 3) and ids[:6, 0].eq(0).all() and ids[6:, 0].eq(1).all()
    assert torch.equal(ids[6:, 1:], ids[:6, 1:])


def test_kontext_overfits_pairs(kontext_run: dict[str, Any]) -> None:
    assert kontext_run["outcome"] == "finished"
    steps = helpers.step_events(kontext_run["run"])
    assert len(steps) == STEPS
    start = statistics.mean(e["loss"] for e in steps[:5])
    end = statistics.mean(e["loss"] for e in steps[-10:])
    assert end < 0.5 * start, (start, end)
    started = next(e for e in helpers.read_events_of(kontext_run["run"]) if e["event"] == "caching")
    assert started["latents_encoded"] == 4  # two targets and their two controls
    samples = [e for e in helpers.read_events_of(kontext_run["run"]) if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [STEPS] and Path(samples[0]["path"]).is_file()


def test_kontext_lora_loads_into_flux_kontext_pipeline_and_changes_it(kontext_run: dict[str, Any]) -> None:
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**helpers.tiny_pipeline(kontext_run["models"]).components)
    reference = Image.open(kontext_run["toml"].parent / "images" / "control" / "a.jpg").convert("RGB")

    def render() -> np.ndarray:
        return pipe(
            image=reference,
            prompt=f"{helpers.TRIGGER}, red and blue stripes",
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=3.5,
            _auto_resize=False,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).images[0]

    base = render()
    path = kontext_run["run"] / "output" / "tiny.safetensors"
    pipe.load_lora_weights(str(path), adapter_name="run")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="run")
    saved = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    assert set(loaded) == set(saved)
    assert np.abs(render() - base).max() > 1e-4


def test_kontext_resume_continues_with_identical_losses(kontext_run: dict[str, Any]) -> None:
    root = kontext_run["root"]
    toml = make_pairs(root / "small", size=64)
    runs = {}
    for name in ("straight", "resumed"):
        runs[name] = helpers.make_run(
            root / name,
            models=kontext_run["models"],
            toml=toml,
            cache=root / "cache",
            max_train_steps=6,
            learning_rate=1e-2,
        )
    assert _train(runs["straight"]) == "finished"
    assert _train(runs["resumed"], StopAfter(runs["resumed"], 3)) == "interrupted"
    assert _train(runs["resumed"]) == "finished"
    straight = [e["loss"] for e in helpers.step_events(runs["straight"])]
    resumed = [e["loss"] for e in helpers.step_events(runs["resumed"])]
    assert resumed == straight


def test_the_trainer_refuses_a_target_without_its_control(kontext_run: dict[str, Any]) -> None:
    root = kontext_run["root"]
    toml = make_pairs(root / "broken", size=64)
    (toml.parent / "images" / "control" / "b.jpg").unlink()
    run = helpers.make_run(root / "broken-run", models=kontext_run["models"], toml=toml, cache=root / "cache")
    with pytest.raises(InvalidInputError, match=r"edit pairs: .*target\(s\) have no control image .*b\.jpg"):
        _train(run)
