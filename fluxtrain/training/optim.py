"""The optimizer and learning-rate schedule for the LoRA parameters.

`adamw` (torch), `adamw8bit` (bitsandbytes, CUDA only), `adafactor` (transformers, with a fixed
learning rate as kohya runs it) and `prodigy` (prodigyopt; its learning rate is a multiplier,
1.0 as its authors advise). Optional packages are imported only when chosen, with a message
naming the package when it is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from fluxtrain.errors import InvalidInputError

log = logging.getLogger(__name__)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], *, name: str, learning_rate: float
) -> torch.optim.Optimizer:
    """The optimizer `name` over the trainable parameters."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as exc:
            raise InvalidInputError("optimizer 'adamw8bit' needs the bitsandbytes package installed") from exc
        return bitsandbytes.optim.AdamW8bit(params, lr=learning_rate, weight_decay=0.01)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=learning_rate, relative_step=False, scale_parameter=False, warmup_init=False
        )
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise InvalidInputError("optimizer 'prodigy' needs the prodigyopt package installed") from exc
        return Prodigy(params, lr=learning_rate, weight_decay=0.01, safeguard_warmup=True)
    raise InvalidInputError(f"optimizer {name!r} is not one of adamw, adamw8bit, adafactor, prodigy")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, name: str, warmup_steps: int, total_steps: int
) -> LRScheduler:
    """diffusers' schedule `name` over `total_steps` optimizer steps."""
    if warmup_steps and name == "constant":
        log.warning(
            "lr_warmup_steps=%d is ignored by lr_scheduler 'constant' (as in kohya); "
            "use 'constant_with_warmup' to warm up",
            warmup_steps,
        )
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1)
    )
