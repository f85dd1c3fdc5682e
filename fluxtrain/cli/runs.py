"""Run commands: they talk to the running service, whose executor owns the runs.

`--url` (or FLUXTRAIN_URL, default http://127.0.0.1:$PORT) names the service; FLUXTRAIN_API_KEY
is sent as a bearer token. Results go to stdout and nothing else does: progress, notes and
errors go to stderr, so `R=$(fluxtrain train NAME --no-follow)` captures just the run id.
"""

from __future__ import annotations

import json
import os
import time
import typing
import urllib.parse
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
    load_settings,
    with_model_options,
)
from fluxtrain.fsutil import atomic_write_bytes
from fluxtrain.names import header_safe
from fluxtrain.runs.schemas import RunStatus, TrainRequest

console = Console()
notes = Console(stderr=True)
TERMINAL = {"succeeded", "failed", "canceled"}
RUN_STATUSES = typing.get_args(RunStatus)
FOLLOW_RETRIES = 30
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
    settings = load_settings()
    base = url or os.environ.get("FLUXTRAIN_URL") or f"http://127.0.0.1:{settings.port}"
    try:
        parsed = httpx.URL(base)
        valid = parsed.scheme in ("http", "https") and bool(parsed.host) and (parsed.port or 1) <= 65535
    except (httpx.InvalidURL, ValueError):
        valid = False
    if not valid:
        notes.print(
            f"[red]invalid --url:[/] {escape(repr(base))}: expected {escape('http(s)://host[:port]')}",
            highlight=False,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
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
            f"[red]cannot reach the service at {escape(str(client.base_url))}: {escape(str(exc))}[/] "
            "(is `fluxtrain serve` running?)",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED) from exc
    if response.is_error:
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            detail = response.text
        shown = detail if isinstance(detail, str) else _validation_messages(detail)
        notes.print(f"[red]{response.status_code}: {escape(shown)}[/]", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT if response.status_code in BAD_INPUT_STATUSES else EXIT_FAILED)
    try:
        body = response.json() if response.is_success else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("content-type", "no content type")
        notes.print(
            f"[red]the service at {escape(str(client.base_url))} did not answer with fluxtrain's JSON "
            f"(HTTP {response.status_code}, {escape(kind)})[/]: does --url name the service itself?",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)
    return body


def _validation_messages(detail: Any) -> str:
    """FastAPI's list of validation errors as `field: message` lines; anything else as JSON."""
    if isinstance(detail, list) and all(isinstance(item, dict) and "msg" in item for item in detail):
        return "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', [])[1:]) or 'request'}: {item['msg']}"
            for item in detail
        )
    return json.dumps(detail)


def _path(template: str, run_id: str) -> str:
    """A run's endpoint with its id quoted as one path segment, so `../health` names no other endpoint."""
    return template.format(urllib.parse.quote(run_id, safe=""))


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
    with client.stream("GET", _path("/runs/{}/events", run_id), headers=headers, timeout=timeout) as response:
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
    status = _call(client, "GET", _path("/status/{}", run_id))
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
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                failures += 1
                if failures > FOLLOW_RETRIES:
                    progress.stop()
                    notes.print(
                        f"[red]lost the service at {escape(str(client.base_url))}: {escape(str(exc))}[/]; "
                        f"the run may still be going (fluxtrain status {escape(run_id)})",
                        highlight=False,
                    )
                    raise typer.Exit(EXIT_FAILED) from exc
                progress.update(task, description=f"reconnecting ({failures}/{FOLLOW_RETRIES})")
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
        if idempotency_key is not None and not header_safe(idempotency_key):
            raise typer.BadParameter(
                "printable ASCII only (it is sent in an HTTP header)", param_hint="--idempotency-key"
            )
        values = {"output_name": name, **fields, **_parse_set(set_)}
        request = build_request(TrainRequest, values, labels={"output_name": "NAME"})
        body = request.model_dump(mode="json", exclude_unset=True)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with _client(url) as client:
            run_id = _call(client, "POST", "/train", json=body, headers=headers)["run_id"]
            if no_follow:
                typer.echo(run_id)
                return
            notes.print(f"run [bold]{escape(run_id)}[/] queued")
            try:
                final = follow(client, run_id)
            except KeyboardInterrupt:
                if cancel_on_exit:
                    _call(client, "POST", _path("/runs/{}/cancel", run_id))
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
            body = _call(client, "GET", _path("/status/{}", run_id))
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
        if status is not None and status not in RUN_STATUSES:
            raise typer.BadParameter(
                f"{status!r} is not one of {', '.join(RUN_STATUSES)}", param_hint="--status"
            )
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
            body = _call(client, "POST", _path("/runs/{}/cancel", run_id))
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
            body = _call(client, "POST", _path("/runs/{}/contact-sheet", run_id))
            if output is not None:
                artifact = _path("/runs/{}/artifacts/", run_id) + urllib.parse.quote(body["name"])
                try:
                    response = client.get(artifact)
                except httpx.TransportError as exc:
                    notes.print(f"[red]could not download {escape(body['name'])}: {escape(str(exc))}[/]")
                    raise typer.Exit(EXIT_FAILED) from exc
                if response.is_error:
                    notes.print(f"[red]{response.status_code}: could not download {escape(body['name'])}[/]")
                    raise typer.Exit(EXIT_FAILED)
                try:
                    atomic_write_bytes(output, response.content)
                except OSError as exc:
                    notes.print(
                        f"[red]cannot write {escape(str(output))}: {escape(str(exc))}[/]", highlight=False
                    )
                    raise typer.Exit(EXIT_BAD_INPUT) from exc
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
            body = _call(client, "GET", _path("/runs/{}/logs", run_id), params={"tail": tail})
            for line in body["lines"]:
                console.out(line, highlight=False)
            offset = body["next_offset"]
            try:
                while follow_log:
                    time.sleep(1.0)
                    # read the status first: lines written before the run ended are then all in the log
                    ended = _call(client, "GET", _path("/status/{}", run_id))["status"] in TERMINAL
                    body = _call(client, "GET", _path("/runs/{}/logs", run_id), params={"offset": offset})
                    for line in body["lines"]:
                        console.out(line, highlight=False)
                    offset = body["next_offset"]
                    if ended and not body["lines"]:
                        return
            except KeyboardInterrupt:
                raise typer.Exit(130) from None


def _print_status(body: dict[str, Any]) -> None:
    progress = body["progress"]
    console.print(f"run [bold]{escape(body['run_id'])}[/]: [bold]{escape(body['status'])}[/]")
    console.print(
        f"  step {progress['step']}/{progress['total_steps'] or '?'}  epoch {progress['epoch']}"
        f"/{progress['total_epochs'] or '?'}  loss {_fmt(progress['loss'], '{:.4f}')}"
        f"  {_fmt(progress['it_per_s'], '{:.2f}')} it/s  ETA {_fmt(progress['eta_seconds'], '{:.0f}s')}"
    )
    if progress.get("validation_loss") is not None:
        console.print(f"  validation loss {_fmt(progress['validation_loss'], '{:.5f}')}")
    if body.get("best_checkpoint"):
        console.print(f"  best checkpoint {escape(body['best_checkpoint'])}", highlight=False)
    for output in body["outputs"]:
        console.print(
            f"  {escape(output['name'])}  {escape(output['url'] or output['path'])}", highlight=False
        )
    if body.get("waiting"):
        console.print(f"[yellow]{escape(body['waiting'])}[/]", highlight=False)
    for warning in body.get("warnings", []):
        console.print(f"[yellow]warning {warning['kind']}: {escape(warning['message'])}[/]", highlight=False)
    if body["error"]:
        console.print(f"[red]{escape(body['error'])}[/]", highlight=False)
    for line in body["logs"]:
        console.out(f"  | {line}", highlight=False)
