"""Rectified-flow matching as FLUX.1 was trained.

The latent image is packed into 2x2 patches (one token each, 4 x channels wide) and given
position ids (0, row, column); text tokens get all-zero ids. A step draws t in (0, 1), forms
x_t = (1 - t) x0 + t noise and regresses the transformer's raw output on the velocity
noise - x0 with a mean squared error. `shift` sampling (kohya's FLUX recipe) pushes t towards
noise: t = sigmoid(scale * n), n ~ N(0, 1), then t' = s t / (1 + (s - 1) t).
FLUX.1 Kontext appends a reference image's packed latent tokens after the noisy ones, with ids
(1, row, column) on its own grid (FluxKontextPipeline's), and only the noisy tokens' prediction
is kept.

`flux2_shift` (FLUX.2's default) draws t the same way but takes the shift from the image size, as
the FLUX.2 pipelines shift their sampling schedule: mu is linear in the image's token count N
and in the number of sampling steps S (BFL's empirical fit, diffusers' `compute_empirical_mu`):
    m10 = 8.73809524e-05 N + 1.89833333,  m200 = 1.6927e-04 N + 0.45666666,
    mu = m200 + (S - 200) (m200 - m10) / 190    (mu = m200 for N > 4300),
and s = exp(mu), which is the scheduler's exponential time shift e^mu / (e^mu + 1/t - 1). Training
uses S = FLUX2_SHIFT_STEPS, the pipelines' default step count.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

TimestepSampling = Literal["shift", "sigmoid", "uniform", "flux2_shift"]
FLUX2_SHIFT_STEPS = 50


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents to (B, H/2 * W/2, 4C) tokens."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, packed = tokens.shape
    c = packed // 4
    patches = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_ids(height: int, width: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids (0, row, column) of the packed tokens of a `height` x `width` latent."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(length, 3, device=device, dtype=dtype)


def sample_timesteps(
    batch: int,
    *,
    method: TimestepSampling,
    shift: float,
    sigmoid_scale: float,
    generator: torch.Generator,
    image_tokens: int | None = None,
) -> torch.Tensor:
    """Draw t in (0, 1) per sample, on the CPU generator's device; `flux2_shift` needs `image_tokens`."""
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    t = torch.sigmoid(sigmoid_scale * torch.randn(batch, generator=generator))
    if method == "flux2_shift":
        if image_tokens is None:
            raise ValueError("flux2_shift sampling needs the image's token count")
        return shift_timesteps(t, math.exp(flux2_mu(image_tokens, FLUX2_SHIFT_STEPS)))
    return shift_timesteps(t, shift) if method == "shift" else t


def flux2_mu(image_tokens: int, steps: int) -> float:
    """FLUX.2's schedule shift mu for an image of `image_tokens` tokens sampled in `steps` steps."""
    m200 = 1.6927e-04 * image_tokens + 0.45666666
    if image_tokens > 4300:
        return m200
    m10 = 8.73809524e-05 * image_tokens + 1.89833333
    return m200 + (steps - 200) * (m200 - m10) / 190.0


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): towards noise for s > 1, with 0 and 1 kept."""
    return (t * shift) / (1 + (shift - 1) * t)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t broadcast over all but the batch dimension."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error against the velocity noise - x0, in float32."""
    return F.mse_loss(prediction.float(), (noise - x0).float())


def predict_velocity(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    t: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    *,
    guidance: float | None,
    dtype: torch.dtype,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer's velocity for noisy latents (B, C, H, W) at `t`, as packed tokens.

    `guidance` is the distilled guidance of a dev-style transformer, None for one without it.
    `reference` is Kontext's reference latent (B, C, h, w), None without edit pairs.
    Text features are moved to the latents' device; training and validation both call this.
    """
    device = noisy.device
    height, width = noisy.shape[-2:]
    guidance_tensor = None
    if guidance is not None:
        guidance_tensor = torch.full((noisy.shape[0],), guidance, device=device, dtype=dtype)
    tokens = pack_latents(noisy).to(dtype)
    ids = image_ids(height, width, device=device, dtype=dtype)
    targets = tokens.shape[1]
    if reference is not None:
        reference = reference.to(device)
        reference_ids = image_ids(*reference.shape[-2:], device=device, dtype=dtype)
        reference_ids[:, 0] = 1
        tokens = torch.cat([tokens, pack_latents(reference).to(dtype)], dim=1)
        ids = torch.cat([ids, reference_ids])
    return model(
        hidden_states=tokens,
        encoder_hidden_states=hidden.to(device, dtype),
        pooled_projections=pooled.to(device, dtype),
        timestep=t.to(dtype),
        img_ids=ids,
        txt_ids=text_ids(hidden.shape[1], device=device, dtype=dtype),
        guidance=guidance_tensor,
        return_dict=False,
    )[0][:, :targets]
