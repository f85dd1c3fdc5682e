"""What a run tells the runs layer (`events.jsonl`) and its log: one method per event.

Only the main process writes events; every process logs (others at WARNING, see `__main__`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fluxtrain.rundir import EventWriter
from fluxtrain.training.data import StepPlan, TrainingData
from fluxtrain.training.memory import MemoryCheck

log = logging.getLogger("fluxtrain.training")


class RunReport:
    def __init__(self, events: Path, *, enabled: bool) -> None:
        self.events = EventWriter(events, enabled=enabled)

    def started(
        self,
        *,
        output_name: str,
        data: TrainingData,
        plan: StepPlan,
        num_processes: int,
        device: torch.device,
        mixed_precision: str,
        validation_images: int | None = None,
        memory: MemoryCheck | None = None,
    ) -> None:
        """`validation_images`: how many images are held out, when the run validates."""
        held_out = {} if validation_images is None else {"validation_images": validation_images}
        extra = {"memory": memory.model_dump()} if memory is not None else {}
        self.events.emit(
            "started",
            output_name=output_name,
            total_steps=plan.total_steps,
            total_epochs=plan.total_epochs,
            steps_per_epoch=plan.steps_per_epoch,
            images=len(data.images),
            buckets={f"{w}x{h}": n for (w, h), n in sorted(data.buckets.items())},
            num_processes=num_processes,
            device=str(device),
            mixed_precision=mixed_precision,
            **held_out,
            **extra,
        )
        log.info(
            "%d images, %d steps (%d epochs of %d steps) on %s x%d, mixed precision %s",
            *(len(data.images), plan.total_steps, plan.total_epochs, plan.steps_per_epoch),
            *(device, num_processes, mixed_precision),
        )

        if memory is not None:
            log.info(
                "memory: about %.2f GiB of %.2f GiB (memory_preset %s%s)",
                *(memory.estimate_gib["total"], memory.available_gib, memory.preset),
                f", chose {memory.chosen}" if memory.chosen else "",
            )

    def caching(self, latents: tuple[int, int], texts: tuple[int, int], *, seconds: float) -> None:
        """What caching did: (encoded, from cache) of the latents and of the texts."""
        self.events.emit(
            "caching",
            latents_encoded=latents[0],
            latents_cached=latents[1],
            texts_encoded=texts[0],
            texts_cached=texts[1],
            seconds=round(seconds, 3),
        )
        log.info(
            "cache: %d latents encoded, %d from cache; %d captions encoded, %d from cache", *latents, *texts
        )

    def step(
        self,
        *,
        step: int,
        total_steps: int,
        epoch: int,
        loss: float,
        lr: float,
        it_per_s: float,
        memory_mb: float,
    ) -> None:
        self.events.emit(
            "step",
            step=step,
            total_steps=total_steps,
            epoch=epoch,
            loss=loss,
            lr=lr,
            it_per_s=round(it_per_s, 4),
            eta_seconds=round((total_steps - step) / it_per_s, 1),
            memory=round(memory_mb, 1),
        )
        log.info("step %d/%d epoch %d loss %.5f %.2f it/s", step, total_steps, epoch, loss, it_per_s)

    def sample(self, path: Path, *, prompt: str, step: int) -> None:
        self.events.emit("sample", path=path, prompt=prompt, step=step)
        log.info("sample %s (step %d): %s", path.name, step, prompt)

    def validation(self, *, step: int, loss: float, losses: dict[str, float], images: int) -> None:
        """The validation loss at `step` (0: the base model's), overall and per fixed timestep."""
        self.events.emit("validation", step=step, loss=loss, losses=losses, images=images)
        per_t = " ".join(f"t={t}: {value:.5f}" for t, value in losses.items())
        base = " (base model)" if step == 0 else ""
        log.info("validation loss %.5f at step %d%s: %s", loss, step, base, per_t)

    def checkpoint(self, path: Path, *, epoch: int, step: int, validation_loss: float | None = None) -> None:
        extra = {} if validation_loss is None else {"validation_loss": validation_loss}
        self.events.emit("checkpoint", path=path, epoch=epoch, step=step, **extra)
        log.info("checkpoint %s (epoch %d, step %d)", path, epoch, step)

    def contact_sheet(self, path: Path) -> None:
        self.events.emit("contact_sheet", path=path)
        log.info("contact sheet %s", path.name)

    def interrupted(self, *, step: int, epoch: int, state: Path | None) -> None:
        """`state` is the folder holding the step, None when nothing was trained and none exists."""
        self.events.emit("interrupted", step=step, epoch=epoch, **({"state": state} if state else {}))
        log.info("stop requested: stopped at step %d", step)

    def finished(self, path: Path, *, step: int, epoch: int, best: tuple[str, float] | None = None) -> None:
        """`best`: the file name and validation loss of the best LoRA file, when the run validates."""
        extra = {} if best is None else {"best_checkpoint": best[0], "best_validation_loss": best[1]}
        self.events.emit("finished", path=path, step=step, epoch=epoch, **extra)
        log.info("finished: %s", path)
        if best is not None:
            log.info("best checkpoint: %s (validation loss %.5f)", *best)

    def close(self) -> None:
        self.events.close()
