"""Resumable state: `state/` holds what an interrupted run needs to go on as if never stopped.

It is accelerate's checkpoint folder (optimizer, scheduler, RNG states, the step counter) with the
LoRA's weights written by our own hook, so the frozen base model is never copied into it. The
LoRA file's metadata records the step and the run.json fields the state depends on, so both can
be checked before anything is loaded.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.lora import load_lora_state_dict, lora_state_dict

STATE_LORA_FILE = "lora_state.safetensors"
# run.json fields a saved state depends on: the adapter's shapes and scale, the optimizer's state, the
# images held out of training.
STATE_FIELDS = ("network_dim", "network_alpha", "optimizer", "full_bf16", "validation_split")


@dataclass
class StepCounter:
    """Completed optimizer steps; saved in `state/` with the optimizer and RNG states."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def make_resumable(
    accelerator: Accelerator,
    *,
    transformer: torch.nn.Module,
    scheduler: object,
    counter: StepCounter,
    config: TrainConfig,
) -> None:
    """Have accelerate's save/load of `state/` carry the scheduler, the counter and the LoRA's weights.

    The hooks take the models out of accelerate's own handling, which would write the whole
    transformer, and write or read the LoRA alone instead (the main process writes it).
    """
    accelerator.register_for_checkpointing(scheduler, counter)

    def save_lora(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            state = {k: v.contiguous() for k, v in lora_state_dict(transformer).items()}
            metadata = {"step": str(counter.step)}
            metadata.update({name: json.dumps(getattr(config, name)) for name in STATE_FIELDS})
            save_file(state, str(Path(output_dir) / STATE_LORA_FILE), metadata=metadata)

    def load_lora(models: list, input_dir: str) -> None:
        models.clear()
        load_lora_state_dict(transformer, load_file(str(Path(input_dir) / STATE_LORA_FILE)))

    accelerator.register_save_state_pre_hook(save_lora)
    accelerator.register_load_state_pre_hook(load_lora)


def has_state(state_dir: Path) -> bool:
    return (state_dir / STATE_LORA_FILE).exists()


def save_state(accelerator: Accelerator, state_dir: Path) -> None:
    """Write `state_dir` atomically: a fresh folder beside it, then swapped in for the old one."""
    staging = state_dir.with_name(f"{state_dir.name}.tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = state_dir.with_name(f"{state_dir.name}.old")
        if state_dir.exists():
            state_dir.rename(old)
        staging.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def saved_step(state_dir: Path) -> int | None:
    """The step `state_dir` holds (None without one), known before it is loaded."""
    if not has_state(state_dir):
        return None
    with safe_open(str(state_dir / STATE_LORA_FILE), framework="pt") as handle:
        return int((handle.metadata() or {}).get("step", 0))


def check_state_matches(state_dir: Path, config: TrainConfig) -> None:
    """Refuse a state saved under other values of the fields it depends on, naming them."""
    with safe_open(str(state_dir / STATE_LORA_FILE), framework="pt") as handle:
        saved = handle.metadata() or {}
    changed = [
        f"{name} {json.loads(saved[name])!r} -> {getattr(config, name)!r}"
        for name in STATE_FIELDS
        if name in saved and json.loads(saved[name]) != getattr(config, name)
    ]
    if changed:
        raise InvalidInputError(
            f"{state_dir} was saved by this run with other settings ({'; '.join(changed)}): "
            "restore them in run.json to resume, or remove state/ to train from the start"
        )
