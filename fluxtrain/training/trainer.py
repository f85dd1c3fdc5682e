"""The training loop: one run directory in, a LoRA file out.

Order of work: validate run.json, read the dataset, fill the latent and text caches (encoders
loaded only for what is missing, then dropped), load the transformer, attach the LoRA, resume
from `state/` when it exists, then step. Every step's randomness (timesteps, noise, flips,
caption choice) comes from a generator seeded by (seed, step, rank), so a resumed run draws the
same numbers as an uninterrupted one.
Under `accelerate launch --num_processes N` (or torchrun; over gloo on a host without GPUs) each
process takes every Nth batch, gradients are averaged, and only the main process writes files and
events.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.cache import cache_latents, cache_texts, load_batch, open_cache, training_captions
from fluxtrain.training.config import DEFAULT_MAX_TRAIN_STEPS, TrainConfig
from fluxtrain.training.data import epoch_batches, load_training_data
from fluxtrain.training.distributed import (
    any_process_stopped,
    check_replicas_agree,
    exclude_frozen_from_ddp,
    make_accelerator,
    peak_memory_mb,
)
from fluxtrain.training.events import EventLog
from fluxtrain.training.export import write_lora_file
from fluxtrain.training.flow import (
    flow_loss,
    image_ids,
    noisy_latents,
    pack_latents,
    sample_timesteps,
    text_ids,
)
from fluxtrain.training.lora import load_lora_transformer
from fluxtrain.training.model_checks import transformer_has_guidance
from fluxtrain.training.model_files import resolve_model_files
from fluxtrain.training.optim import build_optimizer, build_scheduler
from fluxtrain.training.precision import run_precision
from fluxtrain.training.sampling import load_sample_autoencoder, render_samples
from fluxtrain.training.state import (
    StepCounter,
    check_state_matches,
    has_state,
    make_resumable,
    save_state,
    saved_step,
)
from fluxtrain.training.stop import StopFlag

log = logging.getLogger("fluxtrain.training")


@dataclass
class RunPaths:
    root: Path

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def state(self) -> Path:
        return self.root / "state"


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one step on one process."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class Trainer:
    """Holds one run's models and state; `run()` trains it to the end or to a stop request."""

    def __init__(self, run_dir: Path, config: TrainConfig, *, stop: StopFlag) -> None:
        from fluxtrain.settings import get_settings

        self.paths = RunPaths(run_dir)
        self.config = config
        self.stop = stop
        if config.dataset_config is None:
            raise InvalidInputError("dataset_config: run.json must name the dataset TOML")
        settings = None
        if config.models_root is None or config.cache_dir is None:
            settings = get_settings()
        self.models_root = config.models_root or settings.models_root
        self.cache_root = config.cache_dir or settings.cache_dir
        self.accelerator = make_accelerator(config.resolved_mixed_precision)
        self.device = self.accelerator.device
        self.precision = run_precision(
            mixed_precision=config.resolved_mixed_precision,
            full_bf16=config.full_bf16,
            fp8_base=config.fp8_base,
            device=self.device,
        )
        self.events = EventLog(self.paths.events, enabled=self.accelerator.is_main_process)
        self.progress = StepCounter()
        self.last_sample_step = -1
        self.state_step: int | None = None

    # --- set-up -----------------------------------------------------------------------------------

    def cache_latents(self) -> None:
        self.latent_counts = cache_latents(
            self.cache,
            self.data,
            files=self.files,
            accelerator=self.accelerator,
            dtype=self.precision.autoencoder,
        )

    def cache_texts(self) -> None:
        """Encode the captions and prompts the cache lacks, then report what caching did."""
        captions = training_captions(
            self.data,
            caption_dropout_rate=self.config.caption_dropout_rate,
            sample_prompts=self.config.sample_prompts,
        )
        texts_encoded, texts_cached = cache_texts(
            self.cache, captions, files=self.files, accelerator=self.accelerator, dtype=self.precision.encoder
        )
        latents_encoded, latents_cached = self.latent_counts
        self.events.emit(
            "caching",
            latents_encoded=latents_encoded,
            latents_cached=latents_cached,
            texts_encoded=texts_encoded,
            texts_cached=texts_cached,
            seconds=round(time.monotonic() - self.cache_started, 3),
        )
        log.info(
            "cache: %d latents encoded, %d from cache; %d captions encoded, %d from cache",
            latents_encoded,
            latents_cached,
            texts_encoded,
            texts_cached,
        )

    def load_sample_vae(self) -> None:
        """The autoencoder for samples, kept in host memory between renders."""
        if self.config.sample_prompts:
            self.sample_vae = load_sample_autoencoder(self.files, dtype=self.precision.autoencoder)

    def prepare_model(self) -> None:
        """Load the frozen transformer, attach the LoRA, build optimizer and schedule."""
        transformer, self.params = load_lora_transformer(
            self.files.transformer,
            rank=self.config.network_dim,
            alpha=self.config.network_alpha,
            base_dtype=self.precision.base,
            lora_dtype=self.precision.lora,
            fp8_base=self.config.fp8_base,
            gradient_checkpointing=self.config.gradient_checkpointing,
            device=self.device,
        )
        optimizer = build_optimizer(
            self.params, name=self.config.optimizer, learning_rate=self.config.learning_rate
        )
        self.scheduler = build_scheduler(
            optimizer,
            name=self.config.lr_scheduler,
            warmup_steps=self.config.lr_warmup_steps,
            total_steps=self.total_steps,
        )
        if self.accelerator.num_processes > 1:
            left_out = exclude_frozen_from_ddp(transformer)
            log.info("data parallel over the LoRA only: %d frozen tensors not broadcast", len(left_out))
        self.transformer, self.optimizer = self.accelerator.prepare(transformer, optimizer)
        make_resumable(
            self.accelerator,
            transformer=self.unwrapped,
            scheduler=self.scheduler,
            counter=self.progress,
            config=self.config,
        )

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.transformer)

    def plan_steps(self) -> None:
        """Steps per epoch (batches shared out over processes), total steps and epochs."""
        batches = len(epoch_batches(self.data, epoch=0, seed=self.config.seed))
        self.steps_per_epoch = max(1, math.ceil(batches / self.accelerator.num_processes))
        if self.config.max_train_steps is not None:
            self.total_steps = self.config.max_train_steps
        elif self.config.max_train_epochs is not None:
            self.total_steps = self.config.max_train_epochs * self.steps_per_epoch
        else:
            self.total_steps = DEFAULT_MAX_TRAIN_STEPS
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    # --- checkpoints ------------------------------------------------------------------------------

    def save_state(self) -> None:
        save_state(self.accelerator, self.paths.state)
        self.state_step = self.progress.step

    def resume(self) -> None:
        """Load `state/` when a previous process of this run left one."""
        if not has_state(self.paths.state):
            return
        self.accelerator.load_state(str(self.paths.state))
        self.state_step = self.progress.step
        log.info("resumed from %s at step %d", self.paths.state, self.progress.step)

    def save_lora_file(self, path: Path, *, epoch: int) -> None:
        if self.accelerator.is_main_process:
            write_lora_file(
                path,
                self.unwrapped,
                config=self.config,
                data=self.data,
                base_model=self.files.transformer,
                step=self.progress.step,
                epoch=epoch,
                dtype=self.precision.export,
            )

    def checkpoint(self, epoch: int) -> None:
        path = self.paths.output / f"{self.config.output_name}-{epoch:06d}.safetensors"
        self.save_lora_file(path, epoch=epoch)
        self.save_state()
        self.events.emit("checkpoint", path=path, epoch=epoch, step=self.progress.step)
        log.info("checkpoint %s (epoch %d, step %d)", path, epoch, self.progress.step)

    # --- samples ----------------------------------------------------------------------------------

    def render_samples(self) -> None:
        if not self.config.sample_prompts or not self.accelerator.is_main_process:
            return
        step = self.progress.step
        for path, prompt in render_samples(
            self.unwrapped,
            self.sample_vae,
            config=self.config,
            cache=self.cache,
            resolution=self.data.resolution,
            step=step,
            samples_dir=self.paths.samples,
            accelerator=self.accelerator,
            dtype=self.precision.compute,
        ):
            self.events.emit("sample", path=path, prompt=prompt, step=step)
            log.info("sample %s (step %d): %s", path.name, step, prompt)
        self.last_sample_step = step

    # --- the loop ---------------------------------------------------------------------------------

    def train_step(self, indices: list[int]) -> float:
        generator = step_generator(self.config.seed, self.progress.step, self.accelerator.process_index)
        x0, hidden, pooled = load_batch(
            self.cache,
            self.data,
            indices,
            caption_dropout_rate=self.config.caption_dropout_rate,
            generator=generator,
        )
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(
            x0.shape[0],
            method=self.config.timestep_sampling,
            shift=self.config.discrete_flow_shift,
            sigmoid_scale=self.config.sigmoid_scale,
            generator=generator,
        )
        device, dtype = self.device, self.precision.compute
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        model_input = pack_latents(noisy_latents(x0, noise, t)).to(dtype)
        height, width = x0.shape[-2:]
        guidance = None
        if self.unwrapped.config.guidance_embeds:
            guidance = torch.full((x0.shape[0],), self.config.guidance_scale, device=device, dtype=dtype)
        with self.accelerator.autocast():
            prediction = self.transformer(
                hidden_states=model_input,
                encoder_hidden_states=hidden.to(device, dtype),
                pooled_projections=pooled.to(device, dtype),
                timestep=t.to(dtype),
                img_ids=image_ids(height, width, device=device, dtype=dtype),
                txt_ids=text_ids(hidden.shape[1], device=device, dtype=dtype),
                guidance=guidance,
                return_dict=False,
            )[0]
        loss = flow_loss(prediction, pack_latents(x0), pack_latents(noise))
        self.accelerator.backward(loss)
        if self.config.max_grad_norm > 0 and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.gather(loss.detach()).mean())

    def stop_requested(self) -> bool:
        return any_process_stopped(self.accelerator, self.stop.requested)

    def run(self) -> str:
        """Train to the end ('finished') or until a stop request ('interrupted').

        A stop is honoured between set-up phases too: with real FLUX weights caching and loading
        take minutes, longer than the runs layer waits after SIGTERM before it kills the process.
        """
        config = self.config
        set_seed(config.seed)
        self.data = load_training_data(config.dataset_config, enable_bucket=config.enable_bucket)
        self.files = resolve_model_files(config, self.models_root)
        self.plan_steps()
        self.events.emit(
            "started",
            output_name=config.output_name,
            total_steps=self.total_steps,
            total_epochs=self.total_epochs,
            steps_per_epoch=self.steps_per_epoch,
            images=len(self.data.images),
            buckets={f"{w}x{h}": n for (w, h), n in sorted(self.data.buckets.items())},
            num_processes=self.accelerator.num_processes,
            device=str(self.device),
            mixed_precision=self.precision.mixed_precision,
        )
        log.info(
            "%d images, %d steps (%d epochs of %d steps) on %s x%d, mixed precision %s",
            len(self.data.images),
            self.total_steps,
            self.total_epochs,
            self.steps_per_epoch,
            self.device,
            self.accelerator.num_processes,
            self.precision.mixed_precision,
        )
        guided = transformer_has_guidance(self.files.transformer, config.pretrained_model)
        self.cache_started = time.monotonic()
        self.cache = open_cache(self.cache_root, self.files, max_length=512 if guided else 256)
        phases = (self.cache_latents, self.cache_texts, self.load_sample_vae, self.prepare_model, self.resume)
        self.state_step = saved_step(self.paths.state)
        if self.state_step is not None:
            check_state_matches(self.paths.state, config)
        for phase in phases:
            if self.stop_requested():
                return self.interrupted(step=self.state_step)
            phase()
        if self.stop_requested():
            return self.interrupted(step=self.state_step)
        return self.loop()

    def loop(self) -> str:
        """Step to total_steps. A step's own work (samples, the epoch's checkpoint) is done before a
        stop request is honoured, so a resumed run never skips or repeats any of it."""
        config = self.config
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        started_at, started_step, paused = time.monotonic(), self.progress.step, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # report training, not the encoders
        epoch, mine = -1, []
        while self.progress.step < self.total_steps:
            if self.progress.step // self.steps_per_epoch != epoch:
                epoch = self.progress.step // self.steps_per_epoch
                batches = epoch_batches(self.data, epoch=epoch, seed=config.seed)
                mine = batches[rank::world] or batches
            position = self.progress.step % self.steps_per_epoch
            loss = self.train_step(mine[position % len(mine)])
            self.progress.step += 1
            step = self.progress.step
            it_per_s = (step - started_step) / max(time.monotonic() - started_at - paused, 1e-9)
            self.events.emit(
                "step",
                step=step,
                total_steps=self.total_steps,
                epoch=epoch + 1,
                loss=loss,
                lr=self.scheduler.get_last_lr()[0],
                it_per_s=round(it_per_s, 4),
                eta_seconds=round((self.total_steps - step) / it_per_s, 1),
                memory=round(peak_memory_mb(self.device), 1),
            )
            log.info(
                "step %d/%d epoch %d loss %.5f %.2f it/s", step, self.total_steps, epoch + 1, loss, it_per_s
            )
            if step == self.total_steps:
                break
            pause_from = time.monotonic()
            if config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
                self.render_samples()
            if step % self.steps_per_epoch == 0:
                self.end_epoch(epoch + 1)
            if self.stop_requested():
                return self.interrupted(step=step)
            paused += time.monotonic() - pause_from
        return self.finish()

    def end_epoch(self, epoch: int) -> None:
        """The checkpoint and samples due after `epoch` (1-based) when it is not the run's last."""
        config = self.config
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0:
            self.checkpoint(epoch)
        if config.sample_every_n_epochs and epoch % config.sample_every_n_epochs == 0:
            self.render_samples()

    def interrupted(self, *, step: int | None) -> str:
        """Make sure `state/` holds `step` (None: nothing trained and no state yet) and report the stop.

        Before the model is trained `step` is the one `state/` already holds, so nothing is written.
        """
        if step is not None and self.state_step != step:
            self.save_state()
        fields = {"state": self.paths.state} if step is not None else {}
        step = step or 0
        self.events.emit("interrupted", step=step, epoch=math.ceil(step / self.steps_per_epoch), **fields)
        log.info("stop requested: stopped at step %d", step)
        return "interrupted"

    def finish(self) -> str:
        """Last samples when due, then the final LoRA file."""
        config = self.config
        sampling = config.sample_prompts and (config.sample_every_n_steps or config.sample_every_n_epochs)
        if sampling and self.last_sample_step != self.progress.step:
            self.render_samples()
        check_replicas_agree(self.accelerator, self.params)
        final = self.paths.output / f"{config.output_name}.safetensors"
        epochs_done = math.ceil(self.progress.step / self.steps_per_epoch)
        self.save_lora_file(final, epoch=epochs_done)
        self.accelerator.wait_for_everyone()
        self.events.emit("finished", path=final, step=self.progress.step, epoch=epochs_done)
        log.info("finished: %s", final)
        return "finished"
