"""`fluxtrain caption`: the library call the API makes, with a progress bar and a failure table."""

from __future__ import annotations

from typing import cast

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

from fluxtrain.captioning.prompts import (
    CAPTION_TASKS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_BEAMS,
    DEFAULT_PROMPT,
    CaptionTask,
)
from fluxtrain.errors import FluxtrainError


def caption(
    name: str = typer.Argument(..., help="Dataset folder under $DATA_ROOT/datasets."),
    trigger_word: str = typer.Option(..., "--trigger-word", "-t", help="Written first in every caption."),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="Free text, or a task token such as <CAPTION>."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Re-caption images that already have a caption."
    ),
    task: str | None = typer.Option(None, help=f"Florence-2 caption task: {', '.join(CAPTION_TASKS)}."),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, min=1, max=1024, help="Longest caption."),
    num_beams: int = typer.Option(DEFAULT_NUM_BEAMS, min=1, max=8, help="Beam search width."),
) -> None:
    """Caption every image of a dataset with Florence-2; exits 1 when any image failed."""
    from transformers.utils import logging as transformers_logging

    from fluxtrain.captioning.service import caption_dataset
    from fluxtrain.settings import get_settings

    transformers_logging.disable_progress_bar()

    console = Console(stderr=True)
    if task is not None and task not in CAPTION_TASKS:
        console.print(f"[red]invalid --task:[/red] use one of {', '.join(CAPTION_TASKS)}", highlight=False)
        raise typer.Exit(2)
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
            result = caption_dataset(
                settings=get_settings(),
                name=name,
                trigger_word=trigger_word,
                prompt=prompt,
                overwrite=overwrite,
                task=cast(CaptionTask | None, task),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                on_progress=on_progress,
            )
    except FluxtrainError as exc:
        console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from exc
    out = Console()
    out.print(f"{len(result.captions)} captioned, {len(result.failed)} failed", highlight=False)
    if result.failed:
        table = Table("image", "reason", title="Images that could not be captioned")
        for image, reason in sorted(result.failed.items()):
            table.add_row(image, reason)
        out.print(table)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `fluxtrain caption`."""
    app.command("caption")(caption)
