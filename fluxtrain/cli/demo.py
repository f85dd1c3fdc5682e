"""`fluxtrain demo`: URLs to a LoRA on this machine in under two minutes, through the HTTP API."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import typer
from rich.console import Console


def demo(
    data_dir: Path | None = typer.Option(
        None, help="Folder for models, images, datasets and runs (default: a new temporary folder, kept)."
    ),
    keep_serving: bool = typer.Option(
        False, "--keep-serving", help="Leave the service up on the finished run until Ctrl-C."
    ),
) -> None:
    """Build tiny models, serve a few images on loopback, and drive download -> caption -> config
    -> train -> LoRA through a service started on a free 127.0.0.1 port; stop it all at the end."""
    from fluxtrain.demo import BUDGET_S, Demo

    console = Console(soft_wrap=True)
    folder = data_dir or Path(tempfile.mkdtemp(prefix="fluxtrain-demo-"))
    session = Demo(data_dir=folder, console=console)
    result = None
    try:
        result = session.run()
        console.print(f"[bold]LoRA:[/] {result.lora}", highlight=False)
        if keep_serving:
            _report_budget(console, BUDGET_S, "until the LoRA was written")
            console.print(
                f"Serving on {session.service.url} (API page: {session.service.url}/docs, "
                f"run: {session.service.url}/status/{result.run_id}); Ctrl-C stops it.",
                highlight=False,
            )
            threading.Event().wait()
    except KeyboardInterrupt:
        console.print("Interrupted: stopping what the demo started.")
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    finally:
        session.cancel_unfinished()
        session.service.stop()
    console.print(f"Stopped the service; every file stays under {session.data_dir}", highlight=False)
    if result is not None and not keep_serving:
        _report_budget(console, BUDGET_S, "start-up and shutdown included")


def _report_budget(console: Console, budget_s: float, scope: str) -> None:
    """Wall time since this process started (so interpreter start-up and imports count too)."""
    import psutil

    wall = time.time() - psutil.Process().create_time()
    verdict = "[green]within[/]" if wall <= budget_s else "[red]over[/]"
    console.print(
        f"[bold]Time budget: {wall:.1f} s of {budget_s:.0f} s ({verdict} budget; {scope})[/]", highlight=False
    )


def register(app: typer.Typer) -> None:
    """Add the `demo` command."""
    app.command("demo")(demo)
