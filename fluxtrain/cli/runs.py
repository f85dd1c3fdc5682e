"""Run commands: they talk to the running service, whose executor owns the runs.

`--url` (or FLUXTRAIN_URL, default http://127.0.0.1:$PORT) names the service; FLUXTRAIN_API_KEY
is sent as a bearer token. Results go to stdout and nothing else does: progress, notes and
errors go to stderr, so `R=$(fluxtrain train NAME --no-follow)` captures just the run id.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Column, Table

from fluxtrain.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    build_request,
    documented,
    with_model_options,
)
from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.runs.schemas import TrainRequest
from fluxtrain.settings import get_settings

console = Console()
notes = Console(stderr=True)
TERMINAL = {"succeeded", "failed", "canceled"}
BAD_INPUT_STATUSES = frozenset({400, 413, 422})
TRAIN_OPTION_NAMES = {
    "max_train_epochs": ("--epochs", "--max-train-epochs"),
    "max_train_steps": ("--steps", "--max-train-steps"),
    "learning_rate": ("--learning-rate", "--lr"),
}
UrlOption = typer.Option(
    None, "--url", help="Service URL (default FLUXTRAIN_URL, else http://127.0.0.1:$PORT)."
)


def _client(url: str | None) -> httpx.Client:
    settings = get_settings()
    base = url or os.environ.get("FLUXTRAIN_URL") or f"http://127.0.0.1:{settings.port}"
    headers = {}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    return httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(30.0), trust_env=False)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    """One request; a refused connection or an error answer ends the command with its message.

    An answer that refuses the input (400, 413, 422) exits 2; anything else that failed exits 1.
    """
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        notes.print(
            f"[red]cannot reach the service at {client.base_url}: {exc}[/] (is `fluxtrain serve` running?)"
        )
        raise typer.Exit(EXIT_FAILED) from exc
    if response.is_error:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        notes.print(
            f"[red]{response.status_code}: {detail if isinstance(detail, str) else json.dumps(detail)}[/]"
        )
        raise typer.Exit(EXIT_BAD_INPUT if response.status_code in BAD_INPUT_STATUSES else EXIT_FAILED)
    return response.json()


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set wants KEY=VALUE, got '{pair}'")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return fields


def _sse(client: httpx.Client, run_id: str, after: int) -> Iterator[tuple[str | None, str, dict[str, Any]]]:
    """(id, event name, data) of each server-sent event of a run."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    timeout = httpx.Timeout(30.0, read=None)
    with client.stream("GET", f"/runs/{run_id}/events", headers=headers, timeout=timeout) as response:
        response.raise_for_status()
        event_id, name, data = None, "message", []
        for line in response.iter_lines():
            if line == "":
                if data:
                    try:
                        record = json.loads("\n".join(data))
                    except ValueError:  # a line a killed trainer left half written
                        record = None
                    if isinstance(record, dict):
                        yield event_id, name, record
                    elif event_id is not None:
                        yield event_id, "skipped", {}
                event_id, name, data = None, "message", []
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))


def _fmt(value: Any, pattern: str) -> str:
    return pattern.format(value) if isinstance(value, int | float) else "-"


def follow(client: httpx.Client, run_id: str) -> dict[str, Any]:
    """Show a live progress bar until the run ends; reconnects without losing an event."""
    status = _call(client, "GET", f"/status/{run_id}")
    total = status["progress"]["total_steps"]
    last_id, final = 0, None
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[speed]} it/s  ETA {task.fields[eta]}"),
    )
    with Progress(*columns, console=notes) as progress:
        task = progress.add_task(status["status"], total=total, loss="-", speed="-", eta="-")
        failures = 0
        while final is None:
            try:
                for event_id, name, data in _sse(client, run_id, last_id):
                    failures = 0
                    if event_id is not None:
                        last_id = int(event_id)
                    if name == "status":
                        final = data
                        break
                    kind = data.get("event")
                    total = data.get("total_steps") or total
                    if kind == "step":
                        progress.update(
                            task,
                            description="running",
                            completed=data.get("step", 0),
                            total=total,
                            loss=_fmt(data.get("loss"), "{:.4f}"),
                            speed=_fmt(data.get("it_per_s"), "{:.2f}"),
                            eta=_fmt(data.get("eta_seconds"), "{:.0f}s"),
                        )
                    elif kind in ("started", "caching", "checkpoint", "sample", "interrupted"):
                        progress.update(task, description=kind, total=total)
            except (httpx.TransportError, httpx.HTTPStatusError):
                failures += 1
                if failures > 30:
                    raise
                time.sleep(min(failures, 5))
    return final


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `fluxtrain` app."""

    @app.command()
    @documented
    @with_model_options(TrainRequest, skip=frozenset({"output_name"}), names=TRAIN_OPTION_NAMES)
    def train(
        name: str = typer.Argument(
            ..., metavar="NAME", help="output_name: the LoRA's name and, by default, the dataset's."
        ),
        set_: list[str] = typer.Option([], "--set", help="Any /train field as KEY=VALUE (JSON value)."),
        idempotency_key: str | None = typer.Option(None, help="Send twice, start once."),
        no_follow: bool = typer.Option(False, "--no-follow", help="Print only the run id and return."),
        cancel_on_exit: bool = typer.Option(False, help="Cancel the run when you press Ctrl-C."),
        url: str | None = UrlOption,
        *,
        fields: dict[str, Any],
    ) -> None:
        """Start a training run on the service and follow it (Ctrl-C detaches)."""
        values = {"output_name": name, **fields, **_parse_set(set_)}
        request = build_request(TrainRequest, values, labels={"output_name": "NAME"})
        body = request.model_dump(mode="json", exclude_unset=True)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with _client(url) as client:
            run_id = _call(client, "POST", "/train", json=body, headers=headers)["run_id"]
            if no_follow:
                typer.echo(run_id)
                return
            notes.print(f"run [bold]{run_id}[/] queued")
            try:
                final = follow(client, run_id)
            except KeyboardInterrupt:
                if cancel_on_exit:
                    _call(client, "POST", f"/runs/{run_id}/cancel")
                    notes.print(f"canceling run {run_id}")
                else:
                    notes.print(f"detached; the run goes on (fluxtrain status {run_id})")
                raise typer.Exit(130) from None
        _print_status(final)
        raise typer.Exit(0 if final["status"] == "succeeded" else EXIT_FAILED)

    @app.command()
    @documented
    def status(
        run_id: str,
        as_json: bool = typer.Option(False, "--json", help="Print the raw status object."),
        url: str | None = UrlOption,
    ) -> None:
        """Show a run's status, progress, outputs and last log lines."""
        with _client(url) as client:
            body = _call(client, "GET", f"/status/{run_id}")
        if as_json:
            console.print_json(data=body)
        else:
            _print_status(body)

    @app.command("runs")
    @documented
    def list_runs(
        status: str | None = typer.Option(None, help="queued, running, succeeded, failed or canceled."),
        limit: int = typer.Option(20, min=1, max=1000),
        url: str | None = UrlOption,
    ) -> None:
        """List runs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        with _client(url) as client:
            runs = _call(client, "GET", "/runs", params=params)["runs"]
        # Run ids are what people copy into the next command, so they are never shortened.
        table = Table(Column("run", no_wrap=True, min_width=32), "status", "step", "loss", "created")
        for run in runs:
            progress = run["progress"]
            step = f"{progress['step']}/{progress['total_steps'] or '?'}"
            created = run["created_at"][:16].replace("T", " ")
            table.add_row(run["run_id"], run["status"], step, _fmt(progress["loss"], "{:.4f}"), created)
        console.print(table)

    @app.command()
    @documented
    def cancel(run_id: str, url: str | None = UrlOption) -> None:
        """Cancel a run: a queued one is dropped, a running one saves its state and stops."""
        with _client(url) as client:
            body = _call(client, "POST", f"/runs/{run_id}/cancel")
        console.print(
            f"run {run_id}: {body['status']}" + (" (stopping)" if body["status"] == "running" else "")
        )

    @app.command("contact-sheet")
    @documented
    def contact_sheet(
        run_id: str,
        output: Path | None = typer.Option(None, "--output", "-o", help="Also download it to this file."),
        url: str | None = UrlOption,
    ) -> None:
        """Write a run's contact sheet now (a row per prompt, a column per sampled step); prints its name."""
        with _client(url) as client:
            body = _call(client, "POST", f"/runs/{run_id}/contact-sheet")
            if output is not None:
                response = client.get(f"/runs/{run_id}/artifacts/{body['name']}")
                if response.is_error:
                    notes.print(f"[red]{response.status_code}: could not download {body['name']}[/]")
                    raise typer.Exit(EXIT_FAILED)
                atomic_write_bytes(output, response.content)
                notes.print(f"saved {output} ({len(response.content)} bytes)")
        console.out(body["name"], highlight=False)

    @app.command()
    @documented
    def logs(
        run_id: str,
        tail: int = typer.Option(100, min=1, max=10_000),
        follow_log: bool = typer.Option(
            False, "--follow", "-f", help="Keep printing new lines until the run ends."
        ),
        url: str | None = UrlOption,
    ) -> None:
        """Print the trainer's log."""
        with _client(url) as client:
            body = _call(client, "GET", f"/runs/{run_id}/logs", params={"tail": tail})
            for line in body["lines"]:
                console.out(line, highlight=False)
            offset = body["next_offset"]
            try:
                while follow_log:
                    time.sleep(1.0)
                    # read the status first: lines written before the run ended are then all in the log
                    ended = _call(client, "GET", f"/status/{run_id}")["status"] in TERMINAL
                    body = _call(client, "GET", f"/runs/{run_id}/logs", params={"offset": offset})
                    for line in body["lines"]:
                        console.out(line, highlight=False)
                    offset = body["next_offset"]
                    if ended and not body["lines"]:
                        return
            except KeyboardInterrupt:
                return


def _print_status(body: dict[str, Any]) -> None:
    progress = body["progress"]
    console.print(f"run [bold]{body['run_id']}[/]: [bold]{body['status']}[/]")
    console.print(
        f"  step {progress['step']}/{progress['total_steps'] or '?'}  epoch {progress['epoch']}"
        f"/{progress['total_epochs'] or '?'}  loss {_fmt(progress['loss'], '{:.4f}')}"
        f"  {_fmt(progress['it_per_s'], '{:.2f}')} it/s  ETA {_fmt(progress['eta_seconds'], '{:.0f}s')}"
    )
    if progress.get("validation_loss") is not None:
        console.print(f"  validation loss {_fmt(progress['validation_loss'], '{:.5f}')}")
    if body.get("best_checkpoint"):
        console.print(f"  best checkpoint {body['best_checkpoint']}")
    for output in body["outputs"]:
        console.print(f"  {output['name']}  {output['url'] or output['path']}")
    if body.get("waiting"):
        console.print(f"[yellow]{body['waiting']}[/]")
    for warning in body.get("warnings", []):
        console.print(f"[yellow]warning {warning['kind']}: {escape(warning['message'])}[/]", highlight=False)
    if body["error"]:
        console.print(f"[red]{body['error']}[/]")
    for line in body["logs"]:
        console.out(f"  | {line}", highlight=False)
