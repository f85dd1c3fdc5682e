"""fp8_base: the frozen linear weights stored in float8_e4m3fn, every matmul computed in bf16.

diffusers' layerwise casting stores weights the same way but casts them with forward hooks, so
autograd keeps the bf16 copy of each weight for the backward pass: without gradient checkpointing
every copy stays alive until backward, about 16 GiB more than bf16 storage for FLUX.1-dev. Here
the backward pass casts the float8 weight again instead, so only the float8 weights and the
activations are kept. Modules named `norm*` (FLUX.1's modulation, every final-layer modulation)
and `pos_embed` stay in compute precision, and so do biases: the patterns diffusers' layerwise
casting skips for both transformers, so FLUX.2's shared modulation (`*_modulation*.linear`) is
stored in float8 there as here (`memory.py` counts it so).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STORAGE_DTYPE = torch.float8_e4m3fn
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
KEPT_IN_COMPUTE_DTYPE = ("norm", "pos_embed")


class _Float8Matmul(torch.autograd.Function):
    """`x @ weight.T` with a frozen float8 weight that is cast to `compute_dtype` in both passes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.compute_dtype, ctx.input_dtype = compute_dtype, x.dtype
        return nn.functional.linear(x.to(compute_dtype), weight.to(compute_dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        grad_input = grad.to(ctx.compute_dtype) @ weight.to(ctx.compute_dtype)
        return grad_input.to(ctx.input_dtype), None, None


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is float8; made by `store_float8`, never built directly."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Float8Matmul.apply(x, self.weight, self.compute_dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def store_float8(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Turn every frozen nn.Linear but the modulation into a Float8Linear, in place.

    Meant to run in host memory before the model moves to the GPU, so the device never holds the
    higher-precision weights. Returns how many layers were converted.
    """
    converted = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or any(part in name for part in KEPT_IN_COMPUTE_DTYPE):
            continue
        if any(param.requires_grad for param in module.parameters()):
            continue
        module.weight.data = module.weight.data.to(STORAGE_DTYPE)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(compute_dtype)
        module.__class__ = Float8Linear
        module.compute_dtype = compute_dtype
        converted += 1
    return converted
