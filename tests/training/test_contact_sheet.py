"""The contact sheet: one row per prompt, one column per sampled step, labelled, bounded, and
written at the end of a run whose samples all use the same prompts and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFont

from fluxtrain.rundir import EventWriter, RunDir, append_event, parse_sample_name, read_events
from fluxtrain.training import sampling
from fluxtrain.training.config import load_config
from fluxtrain.training.contact_sheet import (
    FONT_SIZE,
    HEADER_HEIGHT,
    PADDING,
    ROW_LABEL_WIDTH,
    find_samples,
    render_contact_sheet,
    shown_steps,
    write_contact_sheet,
)
from fluxtrain.training.trainer import StopFlag, Trainer
from tests.training import helpers_runs as helpers

COLOURS = {0: (200, 30, 30), 1: (30, 30, 200)}


def _samples(run: RunDir, *, steps: list[int], size: tuple[int, int]) -> None:
    for step in steps:
        for index, colour in COLOURS.items():
            path = run.sample("tiny", step=step, index=index)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, colour).save(path)
            with EventWriter(run.events) as events:
                events.emit("sample", path=path, prompt=f"prompt number {index}", step=step)


def _ink(region: Image.Image) -> int:
    """How many pixels of a label region are clearly not the white background."""
    return int((np.asarray(region.convert("L")) < 128).sum())


def test_grid_is_rows_by_columns_tiles_labelled_with_step_and_validation_loss(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    _samples(run, steps=[10, 20, 30], size=(64, 48))
    for step, loss in ((10, 0.5), (30, 0.25)):
        append_event(run.events, "validation", step=step, loss=loss, losses={"0.5": loss}, images=2)

    path = write_contact_sheet(run, "tiny")
    assert path == run.samples / "tiny-grid.jpg"
    assert parse_sample_name(path.name, "tiny") is None and len(find_samples(run, "tiny")) == 6
    with Image.open(path) as sheet:
        sheet.load()
    assert sheet.format == "JPEG"
    # 64 px tiles are narrower than "val 0.5000": the columns widen to the label, so no digit is cut off
    column = PADDING + int(ImageFont.load_default(size=FONT_SIZE).getlength("val 0.5000")) + PADDING
    assert column > 64
    assert sheet.size[0] >= ROW_LABEL_WIDTH + 3 * column and sheet.size[1] == HEADER_HEIGHT + 2 * 48
    column = (sheet.size[0] - ROW_LABEL_WIDTH) // 3
    line = FONT_SIZE + PADDING
    for index in range(3):
        left = ROW_LABEL_WIDTH + index * column
        step_line = sheet.crop((left, 0, left + column, PADDING + line))
        loss_line = sheet.crop((left, PADDING + line, left + column, HEADER_HEIGHT))
        assert _ink(step_line) > 10
        assert (_ink(loss_line) > 10) == (index != 1), index  # no validation at step 20
    for row in range(2):
        assert (
            _ink(sheet.crop((0, HEADER_HEIGHT + row * 48, ROW_LABEL_WIDTH, HEADER_HEIGHT + row * 48 + 20)))
            > 10
        )
        left, top = ROW_LABEL_WIDTH + 2 * column + (column - 64) // 2 + 8, HEADER_HEIGHT + row * 48 + 8
        tile = np.asarray(sheet.crop((left, top, left + 8, top + 8)), dtype=float)
        assert np.abs(tile.reshape(-1, 3).mean(axis=0) - COLOURS[row]).max() < 12

    assert write_contact_sheet(run, "tiny") == path  # a second sheet ignores the first
    with Image.open(path) as again:
        assert again.size == sheet.size


def test_many_large_samples_are_scaled_into_the_bound_and_no_samples_make_no_sheet(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert write_contact_sheet(run, "tiny") is None
    _samples(run, steps=[1, 2, 3], size=(256, 256))
    with Image.open(write_contact_sheet(run, "tiny", max_side=600)) as sheet:
        tile = 256 * (600 - ROW_LABEL_WIDTH) // (3 * 256)  # the columns bind: 146 px tiles
        assert sheet.size == (ROW_LABEL_WIDTH + 3 * tile, HEADER_HEIGHT + 2 * tile)
        assert max(sheet.size) <= 600
    spread = shown_steps(list(range(1, 10_001)), max_side=8192)
    assert len(spread) == (8192 - ROW_LABEL_WIDTH) // 32 and spread[0] == 1 and spread[-1] == 10_000
    tile = next(iter(find_samples(run, "tiny").values()))
    labelled = render_contact_sheet(
        {(step, 0): tile for step in range(1, 10_001)},
        losses={step: 1.2345 for step in range(1, 10_001)},
        prompts={},
        max_side=8192,
    )
    assert max(labelled.size) <= 8192  # columns as wide as their labels: fewer of them fit


def test_a_run_samples_the_same_prompts_and_seeds_every_time_and_ends_with_a_sheet(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, tuple[float, ...]]] = []
    original = sampling.generate

    def recording(*args: Any, seed: int, t5: Any, **kwargs: Any) -> Any:
        calls.append((seed, tuple(t5.flatten()[:4].tolist())))
        return original(*args, seed=seed, t5=t5, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording)
    toml = helpers.make_dataset(tmp_path / "data")
    prompts = ["zqx, a green disc", "zqx, red and blue stripes"]
    run = helpers.make_run(
        tmp_path / "run",
        models=tiny_models,
        toml=toml,
        cache=tmp_path / "cache",
        max_train_steps=3,
        seed=7,
        sample_prompts=prompts,
        sample_every_n_steps=1,
        sample_steps=1,
    )
    assert Trainer(run, load_config(run / "run.json"), stop=StopFlag()).run() == "finished"
    assert [seed for seed, _ in calls] == [7, 8] * 3
    assert calls[0::2] == [calls[0]] * 3 and calls[1::2] == [calls[1]] * 3 and calls[0][1] != calls[1][1]
    with Image.open(run / "samples" / "tiny-grid.jpg") as sheet:
        assert sheet.size == (ROW_LABEL_WIDTH + 3 * 64, HEADER_HEIGHT + 2 * 64)
    kinds = [e["event"] for e in read_events(run / "events.jsonl")]
    assert kinds[-2:] == ["contact_sheet", "finished"]
