"""`fluxtrain caption`: the library call the API makes, with a progress bar and a failure table."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fluxtrain.captioning.request import CaptionRequest
from fluxtrain.cli.options import (
    EXIT_FAILED,
    build_request,
    documented,
    fail,
    load_settings,
    with_model_options,
)
from fluxtrain.errors import FluxtrainError

OPTION_NAMES = {"trigger_word": ("--trigger-word", "-t")}


@documented
@with_model_options(CaptionRequest, skip=frozenset({"output_name"}), names=OPTION_NAMES)
def caption(
    name: str = typer.Argument(..., help="Dataset folder under $DATA_ROOT/datasets."),
    *,
    fields: dict[str, Any],
) -> None:
    """Caption every image of a dataset with Florence-2; exits 1 when any image failed."""
    request = build_request(CaptionRequest, {"output_name": name, **fields}, labels={"output_name": "NAME"})
    from transformers.utils import logging as transformers_logging

    from fluxtrain.captioning.service import caption_request

    transformers_logging.disable_progress_bar()

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("captioning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    bar: TaskID | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress.add_task("images", total=total, rate="")
        progress.update(bar, completed=done)
        speed = progress.tasks[bar].speed
        progress.update(bar, rate=f"{speed:.2f} images/s" if speed else "")

    try:
        with progress:
            result = caption_request(settings=load_settings(), request=request, on_progress=on_progress)
    except FluxtrainError as exc:
        fail(exc)
    out = Console()
    out.print(f"{len(result.captions)} captioned, {len(result.failed)} failed", highlight=False)
    if result.failed:
        table = Table("image", "reason", title="Images that could not be captioned")
        for image, reason in sorted(result.failed.items()):
            table.add_row(image, reason)
        out.print(table)
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add `fluxtrain caption`."""
    app.command("caption")(caption)
