"""Entry point of the `fluxtrain` command; each module below adds its own commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fluxtrain",
    help="Turn image URLs into a trained FLUX.1 LoRA: download, caption, configure, train.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Address to bind (default FLUXTRAIN_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port to listen on (default PORT, 8000)."),
    reload: bool = typer.Option(False, help="Restart when a file of the package changes (development)."),
) -> None:
    """Run the HTTP service on embedded defaults: SQLite, a local data folder."""
    from pathlib import Path

    import uvicorn

    import fluxtrain
    from fluxtrain.api.app import create_app
    from fluxtrain.errors import UnavailableError
    from fluxtrain.runs.db import get_database
    from fluxtrain.settings import get_settings

    settings = get_settings()
    try:
        get_database(settings)
    except UnavailableError as exc:
        typer.echo(f"fluxtrain serve: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    bind = {"host": host or settings.host, "port": port or settings.port}
    if reload:
        watched = [str(Path(fluxtrain.__file__).parent)]
        uvicorn.run("fluxtrain.api.app:create_app", factory=True, reload=True, reload_dirs=watched, **bind)
    else:
        uvicorn.run(create_app(settings), **bind)


def _register_commands() -> None:
    from fluxtrain.cli import captions, dataset_config, datasets, demo, dev, runs

    for module in (datasets, dataset_config, captions, runs, dev, demo):
        module.register(app)


_register_commands()
