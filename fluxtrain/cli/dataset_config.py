"""`fluxtrain config`: write a dataset's kohya TOML, the same call `POST /create-dataset-config` makes.

Its options are the request model's fields, so defaults and bounds are the API's own.
"""

from __future__ import annotations

from typing import Any

import typer

from fluxtrain.cli.options import build_request, documented, fail, load_settings, with_model_options
from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.errors import FluxtrainError

OPTION_NAMES = {"trigger_word": ("--trigger-word", "-t"), "enable_bucket": ("--bucket",)}


@documented
@with_model_options(DatasetConfig, skip=frozenset({"output_name"}), names=OPTION_NAMES)
def config(
    name: str = typer.Argument(..., metavar="NAME", help="Dataset folder under $DATA_ROOT/datasets/."),
    *,
    fields: dict[str, Any],
) -> None:
    """Write $DATA_ROOT/datasets/NAME.toml, the kohya-style dataset config for training."""
    request = build_request(
        DatasetConfig,
        {"output_name": name, **fields},
        labels={"output_name": "NAME", "enable_bucket": "--bucket", "trigger_word": "--trigger-word"},
    )
    try:
        path = create_dataset_config(settings=load_settings(), request=request)
    except FluxtrainError as exc:
        fail(exc)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `fluxtrain` app."""
    app.command("config")(config)
