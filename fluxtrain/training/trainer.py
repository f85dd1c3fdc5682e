"""The training loop: one run directory in, a LoRA file out.

`setup.py` builds what the run trains with; this module steps it to the end or to a stop request.
Every step's randomness (timesteps, noise, flips, caption choice) comes from a generator seeded by
(seed, step, rank), so a resumed run draws the same numbers as an uninterrupted one. How several
processes share a run: `distributed.py`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import RunDir
from fluxtrain.training import distributed, flow, state
from fluxtrain.training.cache import load_batch
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.contact_sheet import write_contact_sheet
from fluxtrain.training.data import StepPlan, epoch_batches
from fluxtrain.training.export import write_lora_file
from fluxtrain.training.lora_check import check_lora_file
from fluxtrain.training.precision import run_precision
from fluxtrain.training.report import RunReport
from fluxtrain.training.sampling import render_samples
from fluxtrain.training.setup import Setup, StoppedInSetUp, set_up
from fluxtrain.training.stop import StopFlag

# The paths run.json must carry: the trainer reads no service settings.
RUN_JSON_PATHS = ("dataset_config", "models_root", "cache_dir")


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one step on one process."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class Trainer:
    """One run: `run()` trains it to the end or to a stop request."""

    def __init__(self, run_dir: Path, config: TrainConfig, *, stop: StopFlag) -> None:
        for field in RUN_JSON_PATHS:
            if getattr(config, field) is None:
                raise InvalidInputError(f"{field}: run.json must name it (the runs layer writes it)")
        self.run_dir = RunDir(run_dir)
        self.config = config
        self.stop = stop
        self.accelerator = distributed.make_accelerator(config.resolved_mixed_precision)
        self.device = self.accelerator.device
        self.precision = run_precision(
            mixed_precision=config.resolved_mixed_precision,
            full_bf16=config.full_bf16,
            fp8_base=config.fp8_base,
            device=self.device,
        )
        self.report = RunReport(self.run_dir.events, enabled=self.accelerator.is_main_process)
        self.counter = state.StepCounter()
        self.state_step: int | None = None  # the step `state/` holds
        self.last_sample_step = -1

    def stop_requested(self) -> bool:
        return distributed.any_process_stopped(self.accelerator, self.stop.requested)

    def run(self) -> str:
        """Train to the end ('finished') or until a stop request ('interrupted'), set-up included."""
        try:
            return self.train(self.set_up())
        except StoppedInSetUp as stopped:
            self.state_step = stopped.state_step
            return self.interrupted(stopped.plan, step=stopped.state_step)
        finally:
            self.report.close()

    def set_up(self) -> Setup:
        return set_up(
            self.config,
            models_root=self.config.models_root,
            cache_root=self.config.cache_dir,
            state_dir=self.run_dir.state,
            accelerator=self.accelerator,
            precision=self.precision,
            counter=self.counter,
            report=self.report,
            stop_requested=self.stop_requested,
        )

    def train(self, setup: Setup) -> str:
        """Step to the plan's end. A step's own work (samples, the epoch's checkpoint) is done before a
        stop request is honoured, so a resumed run never skips or repeats any of it."""
        config, plan, counter = self.config, setup.plan, self.counter
        self.state_step = setup.state_step
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        started_at, started_step, paused = time.monotonic(), counter.step, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # report training, not the encoders
        epoch, mine = -1, []
        while counter.step < plan.total_steps:
            if counter.step // plan.steps_per_epoch != epoch:
                epoch = counter.step // plan.steps_per_epoch
                batches = epoch_batches(setup.data, epoch=epoch, seed=config.seed)
                mine = batches[rank::world] or batches
            position = counter.step % plan.steps_per_epoch
            loss = self.train_step(setup, mine[position % len(mine)])
            counter.step += 1
            step = counter.step
            it_per_s = (step - started_step) / max(time.monotonic() - started_at - paused, 1e-9)
            self.report.step(
                step=step,
                total_steps=plan.total_steps,
                epoch=epoch + 1,
                loss=loss,
                lr=setup.scheduler.get_last_lr()[0],
                it_per_s=it_per_s,
                memory_mb=distributed.peak_memory_mb(self.device),
            )
            if step == plan.total_steps:
                break
            pause_from = time.monotonic()
            if config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
                self.sample(setup)
            if step % plan.steps_per_epoch == 0:
                self.end_epoch(setup, epoch + 1)
            if self.stop_requested():
                return self.interrupted(plan, step=step)
            paused += time.monotonic() - pause_from
        return self.finish(setup)

    def train_step(self, setup: Setup, indices: list[int]) -> float:
        """One optimizer step on the batch `indices`; returns the loss averaged over processes."""
        config, accelerator = self.config, self.accelerator
        generator = step_generator(config.seed, self.counter.step, accelerator.process_index)
        x0, hidden, pooled = load_batch(
            setup.cache,
            setup.data,
            indices,
            caption_dropout_rate=config.caption_dropout_rate,
            generator=generator,
        )
        noise = torch.randn(x0.shape, generator=generator)
        t = flow.sample_timesteps(
            x0.shape[0],
            method=config.timestep_sampling,
            shift=config.discrete_flow_shift,
            sigmoid_scale=config.sigmoid_scale,
            generator=generator,
        )
        device, dtype = self.device, self.precision.compute
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        height, width = x0.shape[-2:]
        guidance = None
        if setup.transformer.config.guidance_embeds:
            guidance = torch.full((x0.shape[0],), config.guidance_scale, device=device, dtype=dtype)
        with accelerator.autocast():
            prediction = setup.model(
                hidden_states=flow.pack_latents(flow.noisy_latents(x0, noise, t)).to(dtype),
                encoder_hidden_states=hidden.to(device, dtype),
                pooled_projections=pooled.to(device, dtype),
                timestep=t.to(dtype),
                img_ids=flow.image_ids(height, width, device=device, dtype=dtype),
                txt_ids=flow.text_ids(hidden.shape[1], device=device, dtype=dtype),
                guidance=guidance,
                return_dict=False,
            )[0]
        loss = flow.flow_loss(prediction, flow.pack_latents(x0), flow.pack_latents(noise))
        accelerator.backward(loss)
        if config.max_grad_norm > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(setup.params, config.max_grad_norm)
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
        return float(accelerator.gather(loss.detach()).mean())

    def end_epoch(self, setup: Setup, epoch: int) -> None:
        """The checkpoint and samples due after `epoch` (1-based) when it is not the run's last."""
        config = self.config
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0:
            self.checkpoint(setup, epoch)
        if config.sample_every_n_epochs and epoch % config.sample_every_n_epochs == 0:
            self.sample(setup)

    def checkpoint(self, setup: Setup, epoch: int) -> None:
        path = self.run_dir.checkpoint(self.config.output_name, epoch)
        self.save_lora(setup, path, epoch=epoch)
        self.save_state()
        self.report.checkpoint(path, epoch=epoch, step=self.counter.step)

    def sample(self, setup: Setup) -> None:
        if setup.sample_vae is None or not self.accelerator.is_main_process:
            return
        step = self.counter.step
        for path, prompt in render_samples(
            setup.transformer,
            setup.sample_vae,
            config=self.config,
            cache=setup.cache,
            resolution=setup.data.resolution,
            step=step,
            run=self.run_dir,
            accelerator=self.accelerator,
            dtype=self.precision.compute,
        ):
            self.report.sample(path, prompt=prompt, step=step)
        self.last_sample_step = step

    def save_lora(self, setup: Setup, path: Path, *, epoch: int) -> None:
        if self.accelerator.is_main_process:
            metadata = write_lora_file(
                path,
                setup.transformer,
                config=self.config,
                data=setup.data,
                base_model=setup.files.transformer,
                step=self.counter.step,
                epoch=epoch,
                dtype=self.precision.export,
            )
            check_lora_file(
                path,
                setup.transformer,
                save_format=self.config.save_format,
                rank=self.config.network_dim,
                dtype=self.precision.export,
                metadata=metadata,
            )

    def save_state(self) -> None:
        state.save_state(self.accelerator, self.run_dir.state)
        self.state_step = self.counter.step

    def interrupted(self, plan: StepPlan, *, step: int | None) -> str:
        """Make sure `state/` holds `step` (None: nothing trained and no state yet) and report the stop.

        Before the model is trained `step` is the one `state/` already holds, so nothing is written.
        """
        if step is not None and self.state_step != step:
            self.save_state()
        state_dir = self.run_dir.state if step is not None else None
        self.report.interrupted(step=step or 0, epoch=plan.epochs_at(step or 0), state=state_dir)
        return "interrupted"

    def finish(self, setup: Setup) -> str:
        """Last samples when due, the final LoRA file, then the contact sheet of every sample."""
        config, step = self.config, self.counter.step
        sampling = config.sample_prompts and (config.sample_every_n_steps or config.sample_every_n_epochs)
        if sampling and self.last_sample_step != step:
            self.sample(setup)
        distributed.check_replicas_agree(self.accelerator, setup.params)
        final = self.run_dir.checkpoint(config.output_name, None)
        self.save_lora(setup, final, epoch=setup.plan.epochs_at(step))
        if self.accelerator.is_main_process:
            sheet = write_contact_sheet(self.run_dir, config.output_name)
            if sheet is not None:
                self.report.contact_sheet(sheet)
        self.accelerator.wait_for_everyone()
        self.report.finished(final, step=step, epoch=setup.plan.epochs_at(step))
        return "finished"
