"""Rectified flow as flow.py defines it: x_t = (1 - t) x0 + t noise, target noise - x0, shifted t."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fluxtrain.training.flow import (
    flow_loss,
    image_ids,
    noisy_latents,
    pack_latents,
    sample_timesteps,
    shift_timesteps,
    unpack_latents,
)


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 6, 8, generator=generator), torch.randn(3, 4, 6, 8, generator=generator)


def test_interpolation_runs_from_the_image_at_0_to_noise_at_1_per_sample() -> None:
    x0, noise = _pair()
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = noisy_latents(x0, noise, t)
    assert torch.equal(x_t[0], x0[0])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(x_t[2], noise[2])


def test_loss_regresses_on_the_velocity_noise_minus_x0() -> None:
    x0, noise = _pair()
    assert flow_loss(noise - x0, x0, noise).item() == 0.0
    assert flow_loss(torch.zeros_like(x0), x0, noise).item() == pytest.approx(
        ((noise - x0) ** 2).mean().item(), rel=1e-6
    )
    # Predicting x0 instead of the velocity is wrong by exactly the noise.
    assert flow_loss(x0, x0, noise).item() == pytest.approx(((noise - 2 * x0) ** 2).mean().item(), rel=1e-6)
    # The target is the derivative of x_t in t: a step of dt moves x_t by dt * (noise - x0).
    t, dt = torch.full((3,), 0.3), 1e-3
    step = (noisy_latents(x0, noise, t + dt) - noisy_latents(x0, noise, t)) / dt
    assert torch.allclose(step, noise - x0, atol=1e-2)


def test_shift_against_hand_computed_values() -> None:
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    # s t / (1 + (s - 1) t) with s = 3: 0.6 / 1.4, 1.5 / 2, 2.7 / 2.8.
    expected = torch.tensor([0.0, 0.6 / 1.4, 0.75, 2.7 / 2.8, 1.0], dtype=torch.float64)
    assert torch.allclose(shift_timesteps(t, 3.0), expected)
    # kohya's FLUX default 3.1582 at t = 0.5: 1.5791 / 2.0791.
    assert shift_timesteps(torch.tensor([0.5], dtype=torch.float64), 3.1582).item() == pytest.approx(
        1.5791 / 2.0791
    )
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_shift_is_the_one_flux_schedulers_apply_to_their_sigmas() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(shift_timesteps(unshifted, 3.0), scheduler.sigmas[:1000], atol=1e-6)


def test_sampled_timesteps_follow_the_method() -> None:
    def draw(method: str, shift: float = 3.0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return sample_timesteps(4096, method=method, shift=shift, sigmoid_scale=1.0, generator=generator)

    sigmoid, shifted, uniform = draw("sigmoid"), draw("shift"), draw("uniform")
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(sigmoid, torch.sigmoid(noise))
    assert torch.allclose(shifted, 3 * sigmoid / (1 + 2 * sigmoid))
    assert (shifted > sigmoid).all() and shifted.mean() > 0.65 > sigmoid.mean()
    for t in (sigmoid, shifted, uniform):
        assert ((t > 0) & (t < 1)).all()
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.02)


def test_packing_is_2x2_patches_with_row_and_column_ids() -> None:
    x0, _ = _pair()
    tokens = pack_latents(x0)
    assert tokens.shape == (3, 3 * 4, 16)
    assert torch.equal(tokens[0, 0], x0[0, :, :2, :2].reshape(-1))
    assert torch.equal(unpack_latents(tokens, 6, 8), x0)
    ids = image_ids(6, 8, device=torch.device("cpu"), dtype=torch.float32)
    assert ids.shape == (12, 3)
    assert ids[5].tolist() == [0.0, 1.0, 1.0]  # second row, second column of a 3 x 4 grid
