"""A run's set-up: everything it trains with, built once, in order, before the first step.

Read the dataset and plan the steps, fill the latent and text caches (encoders loaded only for
what is missing, then dropped), load the transformer with its LoRA, the optimizer and schedule,
and resume from `state/` when a previous process left one. What differs between model families (how
files load, features are made, the LoRA's targets) is the run's `Family`, chosen from the
transformer file. A stop request is honoured between
these phases: with real FLUX weights caching and loading take minutes, longer than the runs layer
waits after SIGTERM before it kills the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LRScheduler

from fluxtrain.dataset_config.toml_file import load_dataset_config
from fluxtrain.model_paths import resolve_model_path
from fluxtrain.training import cache as feature_cache
from fluxtrain.training import state
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.data import StepPlan, TrainingData, plan_steps, run_images
from fluxtrain.training.distributed import exclude_frozen_from_ddp
from fluxtrain.training.edit_pairs import lint_edit_pairs, pair_family
from fluxtrain.training.families.family import Family, FamilyFiles, family_for
from fluxtrain.training.lora import load_lora_transformer
from fluxtrain.training.memory import MemoryCheck
from fluxtrain.training.optim import build_optimizer, build_scheduler
from fluxtrain.training.precision import Precision
from fluxtrain.training.report import RunReport
from fluxtrain.training.validation import ValidationLoss

log = logging.getLogger("fluxtrain.training")


@dataclass(frozen=True)
class Setup:
    """What a run trains with."""

    data: TrainingData
    files: FamilyFiles
    plan: StepPlan
    cache: feature_cache.FeatureCache
    transformer: torch.nn.Module  # the model itself: its LoRA, its config, samples
    model: torch.nn.Module  # the same as accelerate prepared it, for training steps
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    sample_vae: torch.nn.Module | None
    state_step: int | None  # the step `state/` held when the run started; None without one
    family: Family  # how the run's model family loads, encodes and predicts
    validation: ValidationLoss | None = None  # the held-out images, when the run validates


class StoppedInSetUp(Exception):
    """A stop request honoured between set-up phases, before the first step."""

    def __init__(self, plan: StepPlan, state_step: int | None) -> None:
        super().__init__("stop requested during set-up")
        self.plan, self.state_step = plan, state_step


def set_up(
    config: TrainConfig,
    *,
    models_root: Path,
    cache_root: Path,
    state_dir: Path,
    accelerator: Accelerator,
    precision: Precision,
    counter: state.StepCounter,
    report: RunReport,
    stop_requested: Callable[[], bool],
    memory: MemoryCheck | None = None,
) -> Setup:
    """Build the run's Setup; `counter` is resumed in place. Raises StoppedInSetUp on a stop request."""
    set_seed(config.seed)
    data, held_out = run_images(config)
    dataset = load_dataset_config(config.dataset_config)
    transformer = resolve_model_path(models_root, "pretrained_model", config.pretrained_model)
    name = pair_family(transformer, config.pretrained_model, requested=config.model_family, config=dataset)
    lint_edit_pairs(dataset, family=name)
    family = family_for(name)
    files = family.resolve_files(config, models_root)
    plan = plan_steps(data, config, num_processes=accelerator.num_processes)
    report.started(
        output_name=config.output_name,
        data=data,
        plan=plan,
        num_processes=accelerator.num_processes,
        device=accelerator.device,
        mixed_precision=precision.mixed_precision,
        validation_images=len(held_out.images) if held_out else None,
        memory=memory,
    )
    cache_started = time.monotonic()
    cache = family.open_cache(cache_root, files, config)
    state_step = state.saved_step(state_dir)
    if state_step is not None:
        state.check_state_matches(state_dir, config)

    def honour_stop() -> None:
        if stop_requested():
            raise StoppedInSetUp(plan, state_step)

    honour_stop()
    cached = replace(data, images=data.images + held_out.images) if held_out else data
    latents = feature_cache.cache_latents(
        cache, cached, files=files, accelerator=accelerator, dtype=precision.autoencoder, family=family
    )
    honour_stop()
    captions = feature_cache.training_captions(
        data, caption_dropout_rate=config.caption_dropout_rate, sample_prompts=config.sample_prompts
    )
    if held_out:
        captions += [image.captions[0] for image in held_out.images]
    texts = feature_cache.cache_texts(
        cache, captions, files=files, accelerator=accelerator, dtype=precision.encoder, family=family
    )
    report.caching(latents, texts, seconds=time.monotonic() - cache_started)
    honour_stop()
    sample_vae = (
        family.load_autoencoder(files, dtype=precision.autoencoder, device="cpu")
        if config.sample_prompts
        else None
    )
    honour_stop()
    transformer, params = load_lora_transformer(
        files.transformer,
        rank=config.network_dim,
        alpha=config.network_alpha,
        base_dtype=precision.base,
        lora_dtype=precision.lora,
        fp8_base=config.fp8_base,
        gradient_checkpointing=config.gradient_checkpointing,
        device=accelerator.device,
        load=family.load_transformer,
        targets=family.lora_targets,
    )
    optimizer = build_optimizer(params, name=config.optimizer, learning_rate=config.learning_rate)
    scheduler = build_scheduler(
        optimizer, name=config.lr_scheduler, warmup_steps=config.lr_warmup_steps, total_steps=plan.total_steps
    )
    if accelerator.num_processes > 1:
        left_out = exclude_frozen_from_ddp(transformer)
        log.info("data parallel over the LoRA only: %d frozen tensors not broadcast", len(left_out))
    model, optimizer = accelerator.prepare(transformer, optimizer)
    transformer = accelerator.unwrap_model(model)
    state.make_resumable(
        accelerator, transformer=transformer, scheduler=scheduler, counter=counter, config=config
    )
    honour_stop()
    if state.has_state(state_dir):
        accelerator.load_state(str(state_dir))
        state_step = counter.step
        log.info("resumed from %s at step %d", state_dir, counter.step)
    honour_stop()
    return Setup(
        data=data,
        files=files,
        plan=plan,
        cache=cache,
        transformer=transformer,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        sample_vae=sample_vae,
        state_step=state_step,
        validation=ValidationLoss(held_out, cache, seed=config.seed, family=family) if held_out else None,
        family=family,
    )
