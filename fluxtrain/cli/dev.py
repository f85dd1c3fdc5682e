"""Developer commands: tiny local models for tests and the demo."""

from __future__ import annotations

from pathlib import Path

import typer

dev_app = typer.Typer(help="Developer tools: tiny local models for tests and the demo.", no_args_is_help=True)


@dev_app.command("tiny-models")
def tiny_models(
    out_dir: Path = typer.Argument(..., help="Folder to write into; use it as FS_PATH (the models root)."),
) -> None:
    """Write tiny randomly initialised Florence-2, FLUX.1, FLUX.2 [klein] and [dev] models in real formats."""
    from fluxtrain.captioning.tiny import write_tiny_florence2
    from fluxtrain.training.tiny import write_tiny_flux_files
    from fluxtrain.training.tiny_flux2 import write_tiny_flux2_files
    from fluxtrain.training.tiny_flux2_dev import write_tiny_flux2_dev_files

    out_dir.mkdir(parents=True, exist_ok=True)
    florence = write_tiny_florence2(out_dir)
    flux = write_tiny_flux_files(out_dir)
    typer.echo(f"Florence-2: {florence}  (FLUXTRAIN_CAPTION_MODEL={florence})")
    for role, path in flux.items():
        typer.echo(f"{role}: {path}")
    for role, path in write_tiny_flux2_files(out_dir).items():
        typer.echo(f"FLUX.2 {role}: {path}")
    for role, path in write_tiny_flux2_dev_files(out_dir).items():
        typer.echo(f"FLUX.2 [dev] {role}: {path}")
    typer.echo(f"Use FS_PATH={out_dir.resolve()} so /train finds the seed's default file names.")


def register(app: typer.Typer) -> None:
    """Add the `dev` command group."""
    app.add_typer(dev_app, name="dev")
