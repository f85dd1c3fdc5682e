"""The contact sheet: every sample of a run in one JPEG, to compare checkpoints by eye.

Samples are rendered with the same prompts and the same seeds (`config.seed + index`) at every
sampled step (`sampling.render_samples`), so a row shows one prompt and one starting noise as the
LoRA trains. One row per prompt index, one column per sampled step, oldest first; each column is
labelled with its step and, when validation ran at that step, the validation loss of its
`validation` event; each row with its prompt (from the `sample` events). Tiles are scaled down
(never up) so the sheet stays within `MAX_SIDE` pixels a side. Pillow only, no torch: the runs
layer writes a sheet on request from the same files. A column is never narrower than its label, so
small tiles are centred in it rather than the loss being cut off.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.rundir import RunDir, parse_sample_name, read_events

log = logging.getLogger(__name__)

MAX_SIDE = 8192
HEADER_HEIGHT = 40  # two lines: the step, the validation loss
ROW_LABEL_WIDTH = 160
FONT_SIZE = 14
PADDING = 4
MIN_TILE = 32  # a run sampled more often than this allows shows evenly spread steps, first and last kept
JPEG_QUALITY = 90
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)

Cell = tuple[int, int]  # (step, prompt index)


def find_samples(run: RunDir, output_name: str) -> dict[Cell, Path]:
    """Every finished sample of `output_name` by (step, prompt index); the sheet itself is no sample."""
    if not run.samples.is_dir():
        return {}
    found = {}
    for path in run.samples.iterdir():
        cell = parse_sample_name(path.name, output_name)
        if cell is not None and path.is_file():
            found[cell] = path
    return found


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def validation_losses(events: Iterable[dict[str, Any]]) -> dict[int, float]:
    """The overall validation loss by step (the last event of a step wins: a resumed run repeats it)."""
    losses = {}
    for event in events:
        step, loss = _number(event.get("step")), _number(event.get("loss"))
        if event["event"] == "validation" and step is not None and loss is not None:
            losses[int(step)] = loss
    return losses


def sample_prompts(events: Iterable[dict[str, Any]], output_name: str) -> dict[int, str]:
    """Each prompt index's text, from the `sample` events."""
    prompts = {}
    for event in events:
        if event["event"] != "sample" or not isinstance(event.get("prompt"), str):
            continue
        cell = parse_sample_name(Path(str(event.get("path", ""))).name, output_name)
        if cell is not None:
            prompts[cell[1]] = event["prompt"]
    return prompts


def column_label(step: int, loss: float | None) -> list[str]:
    return [f"step {step}"] + ([f"val {loss:.4f}"] if loss is not None else [])


def tile_size(first: Path, *, rows: int, columns: int, max_side: int) -> tuple[int, int]:
    """The samples' own size, scaled down so `rows` x `columns` tiles and the labels fit `max_side`."""
    with Image.open(first) as image:
        width, height = image.size
    scale = min(
        1.0,
        (max_side - ROW_LABEL_WIDTH) / (columns * width),
        (max_side - HEADER_HEIGHT) / (rows * height),
    )
    return max(1, int(width * scale)), max(1, int(height * scale))


def shown_steps(steps: list[int], *, max_side: int, min_column: int = MIN_TILE) -> list[int]:
    """At most as many steps as `min_column`-wide columns fit, evenly spread, the first and last kept."""
    limit = max(2, (max_side - ROW_LABEL_WIDTH) // min_column)
    if len(steps) <= limit:
        return steps
    return [steps[round(i * (len(steps) - 1) / (limit - 1))] for i in range(limit)]


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _label(size: tuple[int, int], lines: list[str], font: ImageFont.ImageFont) -> Image.Image:
    """A label drawn on its own image, so text longer than its cell is clipped, not drawn over others."""
    label = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(label)
    line_height = FONT_SIZE + PADDING
    for number, line in enumerate(lines[: max(1, (size[1] - PADDING) // line_height)]):
        draw.text((PADDING, PADDING + number * line_height), line, fill=INK, font=font)
    return label


def _tile(path: Path, size: tuple[int, int]) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    except OSError as exc:
        log.warning("contact sheet: sample %s is unreadable, left blank: %s", path.name, exc)
        return None


def render_contact_sheet(
    samples: dict[Cell, Path],
    *,
    losses: dict[int, float],
    prompts: dict[int, str],
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """The sheet of `samples` (at least one): rows by prompt index, columns by step, labelled.

    Within `max_side` a side for up to 64 prompts (`TrainConfig.sample_prompts`' bound)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    all_steps = sorted({step for step, _ in samples})
    label_width = max(
        math.ceil(font.getlength(line)) for step in all_steps for line in column_label(step, losses.get(step))
    )
    steps = shown_steps(all_steps, max_side=max_side, min_column=max(MIN_TILE, label_width + 2 * PADDING))
    indices = sorted({index for _, index in samples})
    width, height = tile_size(samples[min(samples)], rows=len(indices), columns=len(steps), max_side=max_side)
    column_width = max(width, label_width + 2 * PADDING)
    size = (ROW_LABEL_WIDTH + column_width * len(steps), HEADER_HEIGHT + height * len(indices))
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for column, step in enumerate(steps):
        label = _label((column_width, HEADER_HEIGHT), column_label(step, losses.get(step)), font)
        sheet.paste(label, (ROW_LABEL_WIDTH + column * column_width, 0))
    for row, index in enumerate(indices):
        lines = _wrapped(draw, prompts.get(index, f"prompt {index}"), font, ROW_LABEL_WIDTH - 2 * PADDING)
        sheet.paste(_label((ROW_LABEL_WIDTH, height), lines, font), (0, HEADER_HEIGHT + row * height))
        for column, step in enumerate(steps):
            path = samples.get((step, index))
            tile = _tile(path, (width, height)) if path is not None else None
            if tile is not None:
                left = ROW_LABEL_WIDTH + column * column_width + (column_width - width) // 2
                sheet.paste(tile, (left, HEADER_HEIGHT + row * height))
    return sheet


def write_contact_sheet(run: RunDir, output_name: str, *, max_side: int = MAX_SIDE) -> Path | None:
    """Write `samples/<name>-grid.jpg` atomically from the samples and events; None without samples."""
    samples = find_samples(run, output_name)
    if not samples:
        return None
    events = read_events(run.events)
    sheet = render_contact_sheet(
        samples,
        losses=validation_losses(events),
        prompts=sample_prompts(events, output_name),
        max_side=max_side,
    )
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    path = run.contact_sheet(output_name)
    atomic_write_bytes(path, buffer.getvalue())
    return path
