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
from fluxtrain.rundir import RunDir, read_events
from fluxtrain.training import distributed, flow, memory, state
from fluxtrain.training.cache import load_features_batch, load_references
from fluxtrain.training.config import TrainConfig
from fluxtrain.training.contact_sheet import write_contact_sheet
from fluxtrain.training.data import StepPlan, epoch_batches
from fluxtrain.training.export import mark_best_checkpoint, write_lora_file
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
        self.config, self.memory = self.check_memory(config)
        config = self.config
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
        self.validated: dict[int, float] = {}  # step -> validation loss (0: the base model)
        self.file_losses: dict[str, float] = {}  # LoRA file name -> validation loss at its step

    def check_memory(self, config: TrainConfig) -> tuple[TrainConfig, memory.MemoryCheck | None]:
        """The memory pre-flight on this run's GPUs (the least free of every process), before any loading."""
        if self.device.type != "cuda":
            return config, None
        available = distributed.smallest_across_processes(
            self.accelerator, memory.free_device_bytes(self.device)
        )
        return memory.check_run_memory(config, available_bytes=available)

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
            memory=self.memory,
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
        if setup.validation is not None:
            self.recall_validation()
            self.validate(setup, step=0)
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
            if config.validation_every_n_steps and step % config.validation_every_n_steps == 0:
                self.validate(setup, step=step)
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
        family = setup.family
        x0, text = load_features_batch(
            setup.cache,
            setup.data,
            indices,
            caption_dropout_rate=config.caption_dropout_rate,
            generator=generator,
        )
        reference = load_references(setup.cache, setup.data, indices)
        noise = torch.randn(x0.shape, generator=generator)
        t = flow.sample_timesteps(
            x0.shape[0],
            method=config.timestep_sampling or family.timestep_sampling,
            shift=config.discrete_flow_shift,
            sigmoid_scale=config.sigmoid_scale,
            generator=generator,
            image_tokens=family.pack(x0[:1]).shape[1],
        )
        device = self.device
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        with accelerator.autocast():
            prediction = family.predict_velocity(
                setup.model,
                flow.noisy_latents(x0, noise, t),
                t,
                text,
                guidance=self.guidance(setup),
                dtype=self.precision.compute,
                reference=reference,
            )
        loss = flow.flow_loss(prediction, family.pack(x0), family.pack(noise))
        accelerator.backward(loss)
        if config.max_grad_norm > 0 and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(setup.params, config.max_grad_norm)
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
        return float(accelerator.gather(loss.detach()).mean())

    def guidance(self, setup: Setup) -> float | None:
        """The distilled guidance the transformer is given; None for one without a guidance embedding."""
        return self.config.guidance_scale if setup.transformer.config.guidance_embeds else None

    def recall_validation(self) -> None:
        """What an earlier process of this run measured up to the step resumed from: the base model's
        figure (not computed again) and each LoRA file's, for the choice of the best one."""
        for event in read_events(self.run_dir.events):
            step = event.get("step")
            if not isinstance(step, int) or step > self.counter.step:
                continue
            if event["event"] == "validation" and step == 0:
                self.validated[0] = event["loss"]
            elif event["event"] == "checkpoint" and "validation_loss" in event:
                self.file_losses[Path(event["path"]).name] = event["validation_loss"]

    def validate(self, setup: Setup, *, step: int) -> float | None:
        """The validation loss at `step` (0: the base model's), measured and reported once per step."""
        if setup.validation is None:
            return None
        if step not in self.validated:
            result = setup.validation.measure(
                setup.transformer,
                base=step == 0,
                guidance=self.guidance(setup),
                dtype=self.precision.compute,
                autocast=self.accelerator.autocast,
            )
            self.report.validation(step=step, loss=result.loss, losses=result.losses, images=result.images)
            self.validated[step] = result.loss
        return self.validated[step]

    def end_epoch(self, setup: Setup, epoch: int) -> None:
        """The checkpoint and samples due after `epoch` (1-based) when it is not the run's last."""
        config = self.config
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0:
            self.checkpoint(setup, epoch)
        if config.sample_every_n_epochs and epoch % config.sample_every_n_epochs == 0:
            self.sample(setup)

    def checkpoint(self, setup: Setup, epoch: int) -> None:
        path = self.run_dir.checkpoint(self.config.output_name, epoch)
        loss = self.validate(setup, step=self.counter.step)
        self.save_lora(setup, path, epoch=epoch)
        self.save_state()
        if loss is not None:
            self.file_losses[path.name] = loss
        self.report.checkpoint(path, epoch=epoch, step=self.counter.step, validation_loss=loss)

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
            reference=load_references(setup.cache, setup.data, [0]),
            family=setup.family,
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
                family=setup.family,
            )
            check_lora_file(
                path,
                setup.transformer,
                save_format=self.config.save_format,
                rank=self.config.network_dim,
                dtype=self.precision.export,
                metadata=metadata,
                rules=setup.family.module_rules(setup.transformer.config),
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
        loss = self.validate(setup, step=step)
        final = self.run_dir.checkpoint(config.output_name, None)
        self.save_lora(setup, final, epoch=setup.plan.epochs_at(step))
        main = self.accelerator.is_main_process
        best = self.settle_best(final, loss) if loss is not None and main else None
        if main:
            sheet = write_contact_sheet(self.run_dir, config.output_name)
            if sheet is not None:
                self.report.contact_sheet(sheet)
        self.accelerator.wait_for_everyone()
        self.report.finished(final, step=step, epoch=setup.plan.epochs_at(step), best=best)
        return "finished"

    def settle_best(self, final: Path, loss: float) -> tuple[str, float]:
        """The LoRA file with the lowest validation loss (the earliest of equals), marked as the best;
        with keep_best_only the other epoch checkpoints are removed (the final file always stays).
        The main process's work: it wrote the files."""
        self.file_losses[final.name] = loss
        present = {name: value for name, value in self.file_losses.items() if (final.parent / name).is_file()}
        best = min(present.items(), key=lambda item: item[1])
        mark_best_checkpoint(final.parent / best[0])
        if self.config.keep_best_only:
            others = [p for p in self.run_dir.lora_files() if p.name not in (best[0], final.name)]
            for path in others:
                path.unlink()
            self.run_dir.note_removed(others)
        return best
