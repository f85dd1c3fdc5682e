"""Entry point of the `fluxtrain` command; each module below adds its own commands."""

from __future__ import annotations

import typer

SHUTDOWN_GRACE_SECONDS = 5

app = typer.Typer(
    name="fluxtrain",
    help="Turn image URLs into a trained FLUX.1 LoRA: download, caption, configure, train.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Address to bind (default FLUXTRAIN_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, min=1, max=65535, help="Port to listen on (default PORT, 8000)."),
    reload: bool = typer.Option(False, help="Restart when a file of the package changes (development)."),
) -> None:
    """Run the HTTP service on embedded defaults: SQLite, a local data folder."""
    from pathlib import Path

    import uvicorn

    import fluxtrain
    from fluxtrain.api.app import create_app
    from fluxtrain.cli.options import load_settings
    from fluxtrain.errors import UnavailableError
    from fluxtrain.runs.db import get_database

    settings = load_settings()
    try:
        get_database(settings)
    except UnavailableError as exc:
        typer.echo(f"fluxtrain serve: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    # Open event streams (a `fluxtrain train` following its run) would hold a SIGTERM off until
    # their runs end; after the grace they are closed, and a client reconnects with Last-Event-ID.
    bind = {
        "host": host or settings.host,
        "port": port if port is not None else settings.port,
        "timeout_graceful_shutdown": SHUTDOWN_GRACE_SECONDS,
    }
    try:
        if reload:
            watched = [str(Path(fluxtrain.__file__).parent)]
            uvicorn.run(
                "fluxtrain.api.app:create_app", factory=True, reload=True, reload_dirs=watched, **bind
            )
        else:
            uvicorn.run(create_app(settings), **bind)
    except SystemExit as exc:
        # uvicorn exits 3 when it cannot bind (address in use, unknown host): a failed operation here
        raise typer.Exit(1 if exc.code else 0) from None


def _register_commands() -> None:
    from fluxtrain.cli import captions, dataset_config, datasets, demo, dev, runs

    for module in (datasets, dataset_config, captions, runs, dev, demo):
        module.register(app)


_register_commands()
