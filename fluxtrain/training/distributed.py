"""Data parallel training: the process group, what DDP syncs, and the checks every process shares.

Under `accelerate launch --num_processes N` (or torchrun; over gloo on a host without GPUs) each
process takes every Nth batch, gradients are averaged, and only the main process writes files and
events.
"""

from __future__ import annotations

import logging
import os
import resource
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("fluxtrain.training")
# Other processes wait in a collective while the main one encodes the whole dataset into the cache
# (with T5-XXL, minutes for a large set); NCCL's default would give up after 10 minutes.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def launched_processes() -> int:
    """How many processes the launcher (torchrun, `accelerate launch`, MPI) started for this run."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def make_accelerator(mixed_precision: str) -> Accelerator:
    """accelerate's state for this process; several processes without CUDA train over gloo on the CPU.

    accelerate only sets up CPU data parallelism when told to use the CPU, so without that flag N
    processes started by torchrun on a GPU-less host would each train alone on the same run
    directory; a launch that still ends up like that is refused.
    """
    world = launched_processes()
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=world > 1 and not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
    )
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"launched as {world} processes but accelerate set up {accelerator.num_processes}: "
            "each would train alone on the same run directory"
        )
    return accelerator


def exclude_frozen_from_ddp(model: torch.nn.Module) -> list[str]:
    """Keep DDP to the LoRA: it would otherwise broadcast every frozen weight from process 0 at start.

    Every process loads the same frozen weights from the same file, so the broadcast (all 12 B
    parameters of FLUX.1-dev, across hosts too) would only send them what they already hold.
    """
    names = [name for name, param in model.named_parameters() if not param.requires_grad]
    names += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def check_replicas_agree(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Refuse to save one process's LoRA as the run's when the processes' copies have drifted apart.

    Data parallel training averages the gradients over all processes, so every copy of the LoRA
    must be bit-identical; each compares float64 sums and sums of squares of every parameter.
    """
    world = accelerator.num_processes
    if world == 1:
        return
    digest = torch.cat(
        [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in params]
    )
    gathered = accelerator.gather(digest[None].to(accelerator.device))
    differing = [rank for rank in range(world) if not torch.equal(gathered[rank], gathered[0])]
    if differing:
        raise RuntimeError(f"LoRA weights of process(es) {differing} differ from process 0's")
    log.info("LoRA weights identical on all %d processes", world)


def any_process_stopped(accelerator: Accelerator, requested: bool) -> bool:
    """True on every process when any process got a stop signal (`requested` is this one's)."""
    if accelerator.num_processes == 1:
        return requested  # no collective, so no device sync at each step
    flag = torch.tensor([1.0 if requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since training began, or the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def smallest_across_processes(accelerator: Accelerator, value: int) -> int:
    """The smallest of every process's `value`, the same on all of them (one gather)."""
    if accelerator.num_processes == 1:
        return value
    gathered = accelerator.gather(torch.tensor([value], dtype=torch.int64, device=accelerator.device))
    return int(gathered.min().item())
