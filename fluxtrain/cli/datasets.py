"""`fluxtrain download`, `fluxtrain datasets` and `fluxtrain lint`: the same library calls the dataset
endpoints make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from fluxtrain.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    build_request,
    documented,
    fail,
    load_settings,
    with_model_options,
)
from fluxtrain.datasets.catalog import summarize_datasets
from fluxtrain.datasets.ingest import DownloadResult, download_images, run_download
from fluxtrain.datasets.lint import EXAMPLES, LintReport
from fluxtrain.datasets.lint_service import LintRequest, lint_dataset
from fluxtrain.errors import FluxtrainError
from fluxtrain.names import check_name

FAILURES_SHOWN = 100


def _read_url_file(path: Path) -> list[str]:
    """The URLs of a file, one a line; blank lines and `#` comments skipped. Not UTF-8: exit 2."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        Console(stderr=True).print(
            f"[red]invalid --file:[/red] {escape(str(path))} is not UTF-8 text "
            f"(byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
            highlight=False,
        )
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


class _RateColumn(ProgressColumn):
    """URLs finished per second, rich's estimate over the last seconds; none in the first second,
    whose few finished URLs would read as tens of thousands a second."""

    def render(self, task: Task) -> Text:
        if not task.elapsed or task.elapsed < 1.0:
            return Text("- img/s")
        return Text(f"{task.speed or 0:.1f} img/s")


def _failure_table(result: DownloadResult) -> Table:
    """The failed URLs with their reasons, the first FAILURES_SHOWN of them (a 10,000-URL list
    that all failed would otherwise scroll every other line away)."""
    failed = list(result.failed.items())
    table = Table(title=f"{len(failed)} URL(s) failed", show_lines=False)
    table.add_column("URL", overflow="fold")
    table.add_column("reason", overflow="fold")
    for url, reason in failed[:FAILURES_SHOWN]:
        table.add_row(Text(url), Text(reason))
    if len(failed) > FAILURES_SHOWN:
        table.add_row(Text(f"(+{len(failed) - FAILURES_SHOWN} more not shown)"), Text(""))
    return table


@documented
def download(
    name: str = typer.Argument(..., metavar="NAME", help="Dataset folder under $DATA_ROOT/datasets/."),
    urls: list[str] | None = typer.Argument(None, metavar="URL...", help="Image URLs (http or https)."),
    file: Path | None = typer.Option(
        None, "--file", "-f", exists=True, dir_okay=False, readable=True, help="A file of URLs, one a line."
    ),
    role: str = typer.Option(
        "target", "--role", help="'target' (training images) or 'control' (edit-pair reference inputs)."
    ),
    control_for: list[str] | None = typer.Option(
        None, "--control-for", help="With --role control, once per URL in order: its stem ('cat', 'cat_0')."
    ),
) -> None:
    """Download images into dataset NAME as JPEGs; exits 1 when any URL failed."""
    console = Console(stderr=True)
    try:
        check_name(name, what="dataset name")
    except ValueError as exc:
        console.print(f"[red]invalid NAME:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    all_urls = list(urls or []) + (_read_url_file(file) if file else [])
    if not all_urls:
        console.print("[red]error:[/red] give at least one URL or --file", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    if role not in ("target", "control"):
        console.print(
            f"[red]invalid --role:[/red] {escape(repr(role))}: 'target' or 'control'", highlight=False
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    settings = load_settings()
    distinct = len(dict.fromkeys(all_urls))
    with Progress(
        TextColumn("[bold]downloading"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("download", total=distinct, failed=0)
        failures = 0

        def advance(_url: str, _path: str | None, reason: str | None) -> None:
            nonlocal failures
            failures += reason is not None
            progress.update(task, advance=1, failed=failures)

        try:
            result = run_download(
                download_images(
                    settings=settings,
                    name=name,
                    urls=all_urls,
                    on_result=advance,
                    role="control" if role == "control" else "target",
                    control_for=control_for or None,
                )
            )
        except FluxtrainError as exc:
            fail(exc)
    console.print(
        f"saved {len(result.files)} of {distinct} image(s) into dataset '{escape(name)}'", highlight=False
    )
    if result.failed:
        console.print(_failure_table(result))
        raise typer.Exit(EXIT_FAILED)


@documented
def datasets() -> None:
    """List datasets with their image and caption counts."""
    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("images", justify="right")
    table.add_column("captions", justify="right")
    for summary in summarize_datasets(settings=load_settings()):
        table.add_row(summary.name, str(summary.images), str(summary.captions))
    Console().print(table)


def _lint_table(report: LintReport) -> Table:
    table = Table(title=f"dataset '{report.dataset}': {report.images} image(s)", show_lines=True)
    table.add_column("severity")
    table.add_column("kind")
    table.add_column("files", overflow="fold")
    table.add_column("message", overflow="fold")
    for finding in report.findings:
        colour = "red" if finding.severity == "error" else "yellow"
        files = "\n".join(finding.files[:EXAMPLES])
        if len(finding.files) > EXAMPLES:
            files += f"\n(+{len(finding.files) - EXAMPLES} more)"
        table.add_row(
            f"[{colour}]{finding.severity}[/]", finding.kind, escape(files), escape(finding.message)
        )
    return table


@documented
@with_model_options(
    LintRequest, names={"trigger_word": ("--trigger-word", "-t"), "enable_bucket": ("--bucket",)}
)
def lint(
    name: str = typer.Argument(..., metavar="NAME", help="Dataset folder under $DATA_ROOT/datasets/."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    *,
    fields: dict[str, Any],
) -> None:
    """Check dataset NAME's images and captions before training (with NAME.toml's settings when it
    exists); exits 1 when it has errors (training would fail), 0 with warnings only."""
    request = build_request(LintRequest, fields, labels={"enable_bucket": "--bucket"})
    try:
        report = lint_dataset(settings=load_settings(), name=name, request=request)
    except FluxtrainError as exc:
        fail(exc)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        console = Console()
        if report.findings:
            console.print(_lint_table(report))
        console.print(
            f"{report.images} image(s): {report.errors} error(s), {report.warnings} warning(s)",
            highlight=False,
        )
    if report.errors:
        raise typer.Exit(EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `fluxtrain` app."""
    app.command()(download)
    app.command()(datasets)
    app.command()(lint)
