"""The dtypes of a run, decided in one place from run.json and the device.

`mixed_precision` bf16 loads the frozen transformer in bf16 and computes under bf16 autocast;
`no` keeps both in float32. `fp8_base` stores the frozen linear weights in float8 and computes in
bf16 whatever else is set. The LoRA weights (and so the optimizer's moments) are float32 unless
`full_bf16`. The text encoders run in bf16 on a GPU and float32 on the CPU; the autoencoder (latent
caching and sample decoding) always in float32. LoRA files are written in the precision the
frozen transformer was loaded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FP8_COMPUTE_DTYPE = torch.bfloat16
AUTOENCODER_DTYPE = torch.float32


@dataclass(frozen=True)
class Precision:
    mixed_precision: Literal["no", "bf16"]
    base: torch.dtype
    compute: torch.dtype
    lora: torch.dtype
    encoder: torch.dtype
    autoencoder: torch.dtype
    export: torch.dtype


def run_precision(
    *, mixed_precision: Literal["no", "bf16"], full_bf16: bool, fp8_base: bool, device: torch.device
) -> Precision:
    """Every dtype of a run on `device`; `mixed_precision` is run.json's, already resolved."""
    base = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    return Precision(
        mixed_precision=mixed_precision,
        base=base,
        compute=FP8_COMPUTE_DTYPE if fp8_base else base,
        lora=torch.bfloat16 if full_bf16 else torch.float32,
        encoder=torch.bfloat16 if device.type == "cuda" else torch.float32,
        autoencoder=AUTOENCODER_DTYPE,
        export=base,
    )
