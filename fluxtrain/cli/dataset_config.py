"""`fluxtrain config`: write a dataset's kohya TOML, the same call `POST /create-dataset-config` makes."""

from __future__ import annotations

import typer
from pydantic import ValidationError
from rich.console import Console

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.errors import FluxtrainError
from fluxtrain.settings import get_settings


def config(
    name: str = typer.Argument(..., metavar="NAME", help="Dataset folder under $DATA_ROOT/datasets/."),
    trigger_word: str = typer.Option(..., "--trigger-word", "-t", help="Class token tied to every image."),
    num_repeats: int = typer.Option(10, help="How often each image is seen per epoch."),
    resolution: int = typer.Option(1024, help="Training side in pixels: a multiple of 64 from 256 to 4096."),
    batch_size: int = typer.Option(1, help="Images per training step."),
    bucket: bool = typer.Option(True, "--bucket/--no-bucket", help="Group images by aspect ratio."),
    min_bucket_reso: int = typer.Option(256, help="Smallest bucket side in pixels."),
    max_bucket_reso: int | None = typer.Option(
        None, help="Largest bucket side in pixels [default: 2048, or the resolution when larger]."
    ),
    bucket_reso_steps: int = typer.Option(64, help="Bucket sides step by this many pixels (multiple of 16)."),
    shuffle_caption: bool = typer.Option(False, "--shuffle-caption", help="Shuffle each caption's tags."),
    keep_tokens: int = typer.Option(1, help="Leading caption tags kept in place when shuffling."),
    caption_extension: str = typer.Option(".txt", help="Suffix of the caption files."),
    flip_aug: bool = typer.Option(False, "--flip-aug", help="Randomly mirror images left to right."),
    color_aug: bool = typer.Option(False, "--color-aug", help="Randomly shift image hue."),
    random_crop: bool = typer.Option(False, "--random-crop", help="Crop at a random place, not the centre."),
) -> None:
    """Write $DATA_ROOT/datasets/NAME.toml, the kohya-style dataset config for training."""
    console = Console(stderr=True)
    try:
        request = DatasetConfig(
            output_name=name,
            trigger_word=trigger_word,
            num_repeats=num_repeats,
            resolution=resolution,
            batch_size=batch_size,
            enable_bucket=bucket,
            min_bucket_reso=min_bucket_reso,
            max_bucket_reso=max_bucket_reso,
            bucket_reso_steps=bucket_reso_steps,
            shuffle_caption=shuffle_caption,
            keep_tokens=keep_tokens,
            caption_extension=caption_extension,
            flip_aug=flip_aug,
            color_aug=color_aug,
            random_crop=random_crop,
        )
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            label = {"output_name": "NAME", "": "options"}.get(field, f"--{field.replace('_', '-')}")
            reason = error["msg"].removeprefix("Value error, ")
            console.print(f"[red]invalid {label}:[/red] {reason}", highlight=False)
        raise typer.Exit(2) from exc
    try:
        path = create_dataset_config(settings=get_settings(), request=request)
    except FluxtrainError as exc:
        console.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from exc
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `fluxtrain` app."""
    app.command("config")(config)
