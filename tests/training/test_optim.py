"""Each optimizer builds and steps; each learning-rate schedule gives its values at known steps."""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch

from fluxtrain.errors import InvalidInputError
from fluxtrain.training.optim import build_optimizer, build_scheduler

LR = 1e-3


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.zeros(4))]


def _step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    loss = sum(((p - 3.0) ** 2).sum() for p in params)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adamw", "AdamW"), ("adafactor", "Adafactor"), ("prodigy", "Prodigy")],
)
def test_each_optimizer_builds_and_moves_the_parameters(name: str, cls: str) -> None:
    params = _params()
    optimizer = build_optimizer(params, name=name, learning_rate=1.0 if name == "prodigy" else LR)
    assert type(optimizer).__name__ == cls
    before = [p.detach().clone() for p in params]
    _step(optimizer, params)
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


def test_adamw_uses_the_given_rate_and_kohyas_weight_decay() -> None:
    group = build_optimizer(_params(), name="adamw", learning_rate=LR).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (LR, 0.01)


def test_adafactor_keeps_a_fixed_rate() -> None:
    group = build_optimizer(_params(), name="adafactor", learning_rate=LR).param_groups[0]
    assert group["lr"] == LR and not group["relative_step"] and not group["scale_parameter"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_names_the_package() -> None:
    with pytest.raises(InvalidInputError, match="bitsandbytes"):
        build_optimizer(_params(), name="adamw8bit", learning_rate=LR)


def test_an_unknown_optimizer_is_refused_listing_the_choices() -> None:
    with pytest.raises(InvalidInputError, match="adamw, adamw8bit, adafactor, prodigy"):
        build_optimizer(_params(), name="sgd", learning_rate=LR)


def _rates(name: str, *, warmup: int, total: int) -> list[float]:
    """The learning rate each of the first `total` optimizer steps uses."""
    params = _params()
    optimizer = build_optimizer(params, name="adamw", learning_rate=LR)
    scheduler = build_scheduler(optimizer, name=name, warmup_steps=warmup, total_steps=total)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        _step(optimizer, params)
        scheduler.step()
    return rates


def test_constant_schedule() -> None:
    assert _rates("constant", warmup=0, total=5) == [LR] * 5


def test_constant_ignores_warmup_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fluxtrain.training.optim"):
        assert _rates("constant", warmup=3, total=5) == [LR] * 5
    assert "lr_warmup_steps=3 is ignored" in caplog.text


def test_constant_with_warmup_ramps_linearly() -> None:
    assert _rates("constant_with_warmup", warmup=4, total=6) == pytest.approx(
        [0.0, LR / 4, LR / 2, 3 * LR / 4, LR, LR]
    )


def test_linear_warms_up_then_decays_to_zero() -> None:
    # Warm-up over 2 steps, then (10 - step) / 8 of the rate.
    expected = [0.0, LR / 2] + [LR * (10 - step) / 8 for step in range(2, 10)]
    assert _rates("linear", warmup=2, total=10) == pytest.approx(expected)


def test_cosine_follows_half_a_cosine_after_warmup() -> None:
    expected = [0.0, LR / 2] + [LR * 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)) for step in range(2, 10)]
    rates = _rates("cosine", warmup=2, total=10)
    assert rates == pytest.approx(expected)
    assert rates[6] == pytest.approx(LR / 2)  # halfway through the decay


def test_a_schedule_over_zero_steps_still_builds() -> None:
    optimizer = build_optimizer(_params(), name="adamw", learning_rate=LR)
    scheduler = build_scheduler(optimizer, name="linear", warmup_steps=0, total_steps=0)
    assert scheduler.get_last_lr() == [LR]
