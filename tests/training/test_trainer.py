"""The training loop in-process on tiny models: it learns, checkpoints, samples, exports and caches."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from fluxtrain.rundir import read_events
from fluxtrain.training import model_files
from fluxtrain.training.config import load_config
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers


def _train(run_dir: Path) -> str:
    return Trainer(run_dir, load_config(run_dir / "run.json"), stop=StopFlag()).run()


def test_overfits_two_images(tiny_models: Path, tmp_path: Path) -> None:
    models = helpers.write_wide_models(tiny_models, tmp_path / "models")
    # 128 px: 16x16 latents through the 8x autoencoder, 64 tokens per image after 2x2 packing.
    toml = helpers.make_dataset(tmp_path / "data", size=128)
    run = helpers.make_run(
        tmp_path / "run",
        models=models,
        toml=toml,
        cache=tmp_path / "cache",
        max_train_steps=160,
        learning_rate=1e-2,
        network_dim=16,
        network_alpha=16.0,
    )
    assert _train(run) == "finished"
    steps = helpers.step_events(run)
    assert [e["step"] for e in steps] == list(range(1, 161))
    first, last = steps[0], steps[-1]
    assert first["epoch"] == 1 and last["epoch"] == 80
    assert {"loss", "lr", "it_per_s", "eta_seconds", "memory"} <= set(first)
    assert last["eta_seconds"] == 0
    start = statistics.mean(e["loss"] for e in steps[:5])
    end = statistics.mean(e["loss"] for e in steps[-10:])
    assert end < 0.5 * start, (start, end)


@pytest.fixture(scope="module")
def checkpointed_run(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three epochs with a checkpoint every epoch, flipped latents, a missing caption and samples."""
    root = tmp_path_factory.mktemp("checkpointed")
    toml = helpers.make_dataset(root / "data", captions=False, flip_aug=True)
    run = helpers.make_run(
        root / "run",
        models=tiny_models,
        toml=toml,
        cache=root / "cache",
        max_train_epochs=3,
        save_every_n_epochs=1,
        sample_prompts=["zqx, a green disc"],
        sample_every_n_epochs=2,
        sample_steps=2,
        gradient_checkpointing=True,
    )
    outcome = _train(run)
    return {"root": root, "run": run, "toml": toml, "outcome": outcome}


def test_checkpoints_samples_and_events(checkpointed_run: dict[str, Any]) -> None:
    run = checkpointed_run["run"]
    assert checkpointed_run["outcome"] == "finished"
    names = sorted(p.name for p in (run / "output").iterdir())
    assert names == ["tiny-000001.safetensors", "tiny-000002.safetensors", "tiny.safetensors"]
    events = read_events(run / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[1] == "caching" and kinds[-1] == "finished"
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [(e["epoch"], e["step"]) for e in checkpoints] == [(1, 2), (2, 4)]
    assert events[1]["latents_encoded"] == 4 and events[1]["texts_encoded"] == 3
    samples = [e for e in events if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [4, 6]
    assert all(Path(e["path"]).is_file() for e in samples)
    assert (run / "state" / "lora_state.safetensors").is_file()
    with safe_open(str(run / "output" / "tiny.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_steps"] == "6" and meta["ss_epoch"] == "3" and meta["ss_network_dim"] == "4"
    assert meta["ss_sd_model_name"] == "flux1-dev.sft" and meta["ss_trigger_word"] == helpers.TRIGGER
    assert meta["ss_resolution"] == "(64, 64)" and len(meta["ss_dataset_hash"]) == 64


def test_final_lora_loads_into_flux_pipeline_and_changes_it(
    tiny_models: Path, checkpointed_run: dict[str, Any]
) -> None:
    path = checkpointed_run["run"] / "output" / "tiny.safetensors"
    pipe = helpers.tiny_pipeline(tiny_models)
    base = helpers.render(pipe)
    pipe.load_lora_weights(str(path), adapter_name="run")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="run")
    saved = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert np.abs(helpers.render(pipe) - base).max() > 1e-4


def test_second_run_encodes_nothing_and_writes_kohya(
    tiny_models: Path, checkpointed_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for name in ("load_clip", "load_t5", "load_autoencoder"):
        original = getattr(model_files, name)

        def counting(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(model_files, name, counting)
    root = checkpointed_run["root"]
    run = helpers.make_run(
        root / "run2",
        models=tiny_models,
        toml=checkpointed_run["toml"],
        cache=root / "cache",
        max_train_steps=2,
        save_format="kohya",
    )
    assert _train(run) == "finished"
    assert calls == []
    caching = next(e for e in read_events(run / "events.jsonl") if e["event"] == "caching")
    assert (caching["latents_encoded"], caching["texts_encoded"]) == (0, 0)
    assert (caching["latents_cached"], caching["texts_cached"]) == (4, 2)
    keys = load_file(run / "output" / "tiny.safetensors").keys()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert all(k.startswith("lora_unet_") for k in keys)
