"""Validation loss on tiny models: held-out images, a bit-identical figure, the best checkpoint."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import RunDir, read_events
from fluxtrain.training.config import TrainConfig, load_config
from fluxtrain.training.data import epoch_batches, held_out_count, hold_out, load_training_data
from fluxtrain.training.trainer import StopFlag, Trainer
from fluxtrain.training.validation import VALIDATION_TIMESTEPS
from tests.training import helpers_runs as helpers

ROOT = Path(__file__).resolve().parents[2]
# steps_per_epoch is 1 (one training image, batch 1): checkpoints after steps 2 and 4, validation
# every 3 steps, the final file at 6.
VALIDATED = {
    "max_train_steps": 6,
    "save_every_n_epochs": 2,
    "validation_split": 1,
    "validation_every_n_steps": 3,
}


class StopAfter:
    """A stop request once `step` is trained, as SIGTERM's handler sets StopFlag (read between steps)."""

    def __init__(self, run: Path, step: int) -> None:
        self.run, self.step = run, step

    @property
    def requested(self) -> bool:
        return any(e["step"] >= self.step for e in helpers.step_events(self.run))


def _trainer(run: Path, stop: Any = None) -> Trainer:
    return Trainer(run, load_config(run / "run.json"), stop=stop or StopFlag())


def _validations(run: Path) -> list[tuple[int, float, dict[str, float], int]]:
    events = read_events(run / "events.jsonl")
    return [(e["step"], e["loss"], e["losses"], e["images"]) for e in events if e["event"] == "validation"]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _config(toml: Path, **fields: Any) -> TrainConfig:
    return TrainConfig(output_name="v", dataset_config=toml, **fields)


def _many_images(root: Path, count: int) -> Path:
    """A dataset of `count` distinct images, the last one copied under a second name."""
    folder = root / "many"
    folder.mkdir(parents=True)
    for index in range(count):
        pixels = np.full((32, 32, 3), index * 20, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    (folder / "zz-copy.png").write_bytes((folder / f"{count - 1:02d}.png").read_bytes())
    toml = root / "many.toml"
    toml.write_text(
        f'[[datasets]]\nresolution = 32\nbatch_size = 2\n\n[[datasets.subsets]]\nimage_dir = "{folder}"\n'
        'class_tokens = "zqx"\nnum_repeats = 2\n',
        encoding="utf-8",
    )
    return toml


@pytest.mark.parametrize(
    ("split", "images", "held"), [(0.25, 8, 2), (0.1, 8, 1), (0.5, 3, 2), (0.2, 5, 1), (3, 4, 3)]
)
def test_a_split_holds_out_a_rounded_share_of_at_least_one_image(
    split: float, images: int, held: int
) -> None:
    assert held_out_count(split, images) == held


@pytest.mark.parametrize(("split", "images"), [(0.9, 2), (2, 2), (5, 3)])
def test_a_split_that_leaves_nothing_to_train_on_is_refused(split: float, images: int) -> None:
    with pytest.raises(InvalidInputError, match="leaves none to train on"):
        held_out_count(split, images)


def test_held_out_images_never_appear_in_a_training_batch(tmp_path: Path) -> None:
    toml = _many_images(tmp_path, 9)
    full = load_training_data(toml)
    chosen = set()
    for seed in range(6):
        training, held = hold_out(full, _config(toml, validation_split=0.3, seed=seed))
        again = hold_out(full, _config(toml, validation_split=0.3, seed=seed))[1]
        assert [i.path for i in held.images] == [i.path for i in again.images]
        assert len(held.images) == 3
        held_content = {image.sha256 for image in held.images}
        assert all(not i.flip_aug and i.num_repeats == 1 for i in held.images)
        trained = {
            training.images[index].sha256
            for epoch in range(40)
            for batch in epoch_batches(training, epoch=epoch, seed=seed)
            for index in batch
        }
        assert trained and not trained & held_content
        assert trained | held_content == {image.sha256 for image in full.images}
        chosen.add(frozenset(held_content))
    assert len(chosen) > 1  # the seed chooses


def test_a_validation_dataset_removes_its_images_from_training(tmp_path: Path) -> None:
    toml = _many_images(tmp_path, 4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "copy.png").write_bytes((tmp_path / "many" / "01.png").read_bytes())
    held_toml = tmp_path / "held.toml"
    held_toml.write_text(
        f'[[datasets]]\nresolution = 32\n\n[[datasets.subsets]]\nimage_dir = "{other}"\n', encoding="utf-8"
    )
    training, held = hold_out(load_training_data(toml), _config(toml, validation_dataset_config=held_toml))
    assert [image.path for image in held.images] == [other / "copy.png"]
    assert [image.path.name for image in training.images] == ["00.png", "02.png", "03.png", "zz-copy.png"]


@pytest.fixture(scope="module")
def validated_runs(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same validated run twice: straight through, and stopped after step 3 then resumed."""
    root = tmp_path_factory.mktemp("validated")
    toml = helpers.make_dataset(root / "data")
    runs = {}
    for name in ("straight", "resumed"):
        runs[name] = helpers.make_run(
            root / name, models=tiny_models, toml=toml, cache=root / "cache", keep_best_only=True, **VALIDATED
        )
    assert _trainer(runs["straight"]).run() == "finished"
    assert _trainer(runs["resumed"], StopAfter(runs["resumed"], 3)).run() == "interrupted"
    assert _trainer(runs["resumed"]).run() == "finished"
    return runs


def test_validation_events_at_base_every_n_steps_checkpoints_and_end(validated_runs: dict[str, Path]) -> None:
    run = validated_runs["straight"]
    events = read_events(run / "events.jsonl")
    assert events[0]["images"] == 1 and events[0]["validation_images"] == 1
    validations = _validations(run)
    assert [v[0] for v in validations] == [0, 2, 3, 4, 6]
    by_step = {step: loss for step, loss, _, _ in validations}
    for _, loss, losses, images in validations:
        assert list(losses) == [str(t) for t in VALIDATION_TIMESTEPS] == ["0.25", "0.5", "0.75", "1.0"]
        assert loss == math.fsum(losses.values()) / 4 and images == 1
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [(e["step"], e["validation_loss"]) for e in checkpoints] == [(2, by_step[2]), (4, by_step[4])]
    finished = events[-1]
    assert finished["event"] == "finished"
    files = {"tiny-000002.safetensors": by_step[2], "tiny-000004.safetensors": by_step[4]}
    files["tiny.safetensors"] = by_step[6]
    best = min(files, key=files.__getitem__)
    assert (finished["best_checkpoint"], finished["best_validation_loss"]) == (best, files[best])
    kept = sorted(p.name for p in (run / "output").iterdir())
    assert kept == sorted({best, "tiny.safetensors"})
    assert _metadata(run / "output" / best)["best_checkpoint"] == "true"


def test_validation_loss_is_bit_identical_across_runs_and_a_stop_and_resume(
    validated_runs: dict[str, Path],
) -> None:
    straight, resumed = (_validations(validated_runs[name]) for name in ("straight", "resumed"))
    assert resumed == straight  # the base figure is not measured again on resume: one step-0 event
    events = read_events(validated_runs["resumed"] / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "interrupted"] == [3]
    finals = [read_events(validated_runs[name] / "events.jsonl")[-1] for name in ("straight", "resumed")]
    assert finals[0]["best_checkpoint"] == finals[1]["best_checkpoint"]


def test_it_falls_on_an_overfit_run_while_the_base_figure_stays_put(
    tiny_models: Path, tmp_path: Path
) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    # The held-out image is a re-encoded copy of a training image: learning that one lowers its loss.
    held = tmp_path / "held" / "images"
    held.mkdir(parents=True)
    Image.open(tmp_path / "data" / "images" / "a.jpg").save(held / "a2.jpg", quality=80)
    (held / "a2.txt").write_text(f"{helpers.TRIGGER}, red and blue stripes", encoding="utf-8")
    held_toml = tmp_path / "held" / "held.toml"
    held_toml.write_text(toml.read_text().replace(str(toml.parent / "images"), str(held)), encoding="utf-8")
    run = helpers.make_run(
        tmp_path / "run",
        models=tiny_models,
        toml=toml,
        cache=tmp_path / "cache",
        max_train_steps=10,
        learning_rate=1e-2,
        network_dim=16,
        network_alpha=16.0,
        validation_dataset_config=str(held_toml),
        validation_every_n_steps=5,
    )
    trainer = _trainer(run)
    setup = trainer.set_up()
    assert trainer.train(setup) == "finished"
    losses = [(step, loss) for step, loss, _, _ in _validations(run)]
    assert [step for step, _ in losses] == [0, 5, 10]
    assert losses[0][1] > losses[1][1] > losses[2][1]
    assert losses[2][1] < 0.95 * losses[0][1]
    base = setup.validation.measure(
        setup.transformer,
        base=True,
        guidance=trainer.guidance(setup),
        dtype=trainer.precision.compute,
        autocast=trainer.accelerator.autocast,
    )
    assert base.loss == losses[0][1]  # the trained adapter, disabled, leaves the base model's figure
    again = setup.validation.measure(
        setup.transformer,
        base=False,
        guidance=trainer.guidance(setup),
        dtype=trainer.precision.compute,
        autocast=trainer.accelerator.autocast,
    )
    assert again.loss == losses[2][1]  # same weights, same float


def test_the_best_is_the_lowest_and_keep_best_only_keeps_it_and_the_final_file(
    tiny_models: Path, tmp_path: Path
) -> None:
    toml = helpers.make_dataset(tmp_path / "data")
    run = helpers.make_run(
        tmp_path / "run",
        models=tiny_models,
        toml=toml,
        cache=tmp_path / "cache",
        keep_best_only=True,
        validation_split=1,
    )
    trainer = _trainer(run)
    output = run / "output"
    output.mkdir()
    losses = {
        "tiny-000001.safetensors": 0.52,
        "tiny-000002.safetensors": 0.31,
        "tiny-000003.safetensors": 0.31,
    }
    for name in [*losses, "tiny.safetensors"]:
        save_file({"w": torch.zeros(2)}, output / name, metadata={"ss_epoch": "1"})
    trainer.file_losses = dict(losses)
    assert trainer.settle_best(output / "tiny.safetensors", 0.4) == ("tiny-000002.safetensors", 0.31)
    assert sorted(p.name for p in output.iterdir()) == ["tiny-000002.safetensors", "tiny.safetensors"]
    assert RunDir(run).removed_keys() == {"output/tiny-000001.safetensors", "output/tiny-000003.safetensors"}
    assert _metadata(output / "tiny-000002.safetensors") == {"ss_epoch": "1", "best_checkpoint": "true"}
    assert "best_checkpoint" not in _metadata(output / "tiny.safetensors")


def test_a_sigterm_and_a_restarted_process_give_the_same_figures(
    validated_runs: dict[str, Path], tiny_models: Path
) -> None:
    straight = validated_runs["straight"]
    root = straight.parent
    run = helpers.make_run(
        root / "sigterm",
        models=tiny_models,
        toml=root / "data" / "dataset.toml",
        cache=root / "cache",
        keep_best_only=True,
        **VALIDATED,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for command in (["-m", "tests.training.sigterm_after", "step:3"], ["-m", "fluxtrain.training"]):
        done = subprocess.run([sys.executable, *command, str(run)], env=env, cwd=ROOT, capture_output=True)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    events = read_events(run / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "interrupted"] == [3]
    assert _validations(run) == _validations(straight)
