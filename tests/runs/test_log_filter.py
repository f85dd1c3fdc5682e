"""The status log keeps the trainer's own lines and drops library warnings and progress bars."""

from __future__ import annotations

from fluxtrain.runs.log_filter import is_library_noise, trainer_lines

NOISE = [
    "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back to "
    "`CLIPImageProcessorPil` for backward compatibility.",
    "/venv/lib/python3.11/site-packages/transformers/utils/import_utils.py:2310: FutureWarning: "
    "torchvision is not available",
    "  warnings.warn(",
    "/venv/lib/python3.11/site-packages/diffusers/models/x.py:40: UserWarning: something deprecated",
    "/x/y.py:1: torch.jit.TracerWarning: careful",
    "DeprecationWarning: old api",
    "Loading checkpoint shards: 100%|██████████| 2/2 [00:01<00:00,  1.50it/s]",
    "caching latents:  50%|█████     | 1/2 [00:00<00:00, 3.1it/s]\rcaching latents: 100%|██████████| 2/2",
    "`torch_dtype` is deprecated! Use `dtype` instead!",
    "",
]
TRAINER = [
    "2026-12-02 13:00:01 INFO fluxtrain.training.trainer: 2 images, 4 steps (2 epochs of 2 steps) on cpu",
    "2026-12-02 13:00:05 INFO fluxtrain.training.trainer: step 1/4 epoch 1 loss 0.91234 0.50 it/s",
    "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "Traceback (most recent call last):",
    "ValueError: warning: the word alone is not a warning line",
]


def test_library_lines_are_noise_and_trainer_lines_are_not() -> None:
    for line in NOISE:
        assert is_library_noise(line), line
    for line in TRAINER:
        assert not is_library_noise(line), line


def test_trainer_lines_keeps_the_last_count_in_order() -> None:
    mixed = [TRAINER[0], NOISE[0], NOISE[1], TRAINER[1], NOISE[6], TRAINER[2]]
    assert trainer_lines(mixed, 2) == [TRAINER[1], TRAINER[2]]
    assert trainer_lines(mixed, 10) == [TRAINER[0], TRAINER[1], TRAINER[2]]
    assert trainer_lines(NOISE, 5) == []
