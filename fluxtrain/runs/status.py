"""The status object of a run: its row, its recent events and log lines, and its LoRA files."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fluxtrain.datasets.lint import LintFinding
from fluxtrain.fsutil import tail_lines
from fluxtrain.rundir import RunDir, first_event, parse_checkpoint_name, recent_events
from fluxtrain.runs.log_filter import trainer_lines
from fluxtrain.runs.schemas import OutputFile, Progress, RunStatusOut
from fluxtrain.runs.table import Run
from fluxtrain.settings import Settings

STATUS_LOG_LINES = 10
# Library noise is dropped from the status log, so more lines are read than are shown.
_LOG_SCAN_LINES = 400
# A validation loss older than the recent events (validation every few hundred steps) is looked for
# this far back.
_VALIDATION_SCAN_LINES = 20_000
_FINDINGS = TypeAdapter(list[LintFinding])


def run_dir(settings: Settings, run_id: str) -> Path:
    return settings.runs_dir / run_id


def last_event(events: list[dict[str, Any]], *kinds: str) -> dict[str, Any] | None:
    return next((e for e in reversed(events) if e["event"] in kinds), None)


def _number(record: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if record is not None and isinstance(record.get(key), int | float):
            return record[key]
    return None


def latest_validation_loss(run: RunDir, events: list[dict[str, Any]]) -> float | None:
    """The last validation loss of the LoRA being trained (step > 0; step 0 is the base model's)."""

    def latest(records: list[dict[str, Any]]) -> float | None:
        trained = [e for e in records if e["event"] == "validation" and _number(e, "step")]
        return _number(trained[-1], "loss") if trained else None

    found = latest(events)
    started = first_event(run.events, "started")
    if found is None and started is not None and "validation_images" in started:
        found = latest(recent_events(run.events, _VALIDATION_SCAN_LINES))
    return found


def progress_of(run: RunDir, events: list[dict[str, Any]]) -> Progress:
    step = last_event(events, "step")
    started = first_event(run.events, "started")
    total_steps = _number(step, "total_steps") or _number(started, "total_steps", "max_train_steps")
    total_epochs = _number(step, "total_epochs") or _number(started, "total_epochs", "max_train_epochs")
    return Progress(
        step=_number(step, "step") or 0,
        total_steps=total_steps,
        epoch=_number(step, "epoch") or 0,
        total_epochs=total_epochs,
        loss=_number(step, "loss"),
        it_per_s=_number(step, "it_per_s"),
        eta_seconds=_number(step, "eta_seconds", "eta"),
        validation_loss=latest_validation_loss(run, events),
    )


def outputs_of(run: RunDir, output_name: str, final_epoch: int | None) -> list[OutputFile]:
    urls = run.uploaded_urls()
    final = run.checkpoint(output_name, None)
    files = []
    for path in run.lora_files():
        epoch = parse_checkpoint_name(path.name, output_name)
        if path == final:
            epoch = final_epoch
        files.append(OutputFile(name=path.name, path=str(path), epoch=epoch, url=urls.get(run.key(path))))
    files.sort(key=lambda f: (f.name == final.name, f.epoch or 0, f.name))
    return files


def shown_status(run: Run) -> str:
    """The status the API gives: a run the backend holds unstarted (a Ray job PENDING) is queued."""
    return "queued" if run.status == "running" and run.backend_waiting is not None else run.status


def _waiting(run: Run) -> str | None:
    """Why a queued run waits: the backend's own message, or a retry of its failed launch ahead."""
    if run.backend_waiting is not None and run.status == "running":
        return run.backend_waiting
    if run.status != "queued" or run.launch_error is None or run.launch_retry_at is None:
        return None
    if run.launch_retry_at <= time.time():
        return None
    retry_at = datetime.fromtimestamp(run.launch_retry_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"could not start the trainer ({run.launch_error}); trying again at {retry_at}"


def lint_warnings_of(run: RunDir) -> list[LintFinding]:
    """The lint warnings kept with the run; none for a run created before lint, or a damaged file."""
    try:
        return _FINDINGS.validate_json(run.lint_warnings.read_bytes())
    except (OSError, ValidationError):
        return []


def build_status(settings: Settings, run: Run, *, logs: list[str] | None = None) -> RunStatusOut:
    """The `/status` object; `logs` comes from the backend when it keeps them elsewhere."""
    folder = RunDir(run_dir(settings, run.id))
    events = recent_events(folder.events)
    progress = progress_of(folder, events)
    finished = last_event(events, "finished")
    final_epoch = _number(finished, "epoch") or progress.total_epochs or progress.epoch or None
    return RunStatusOut(
        run_id=run.id,
        status=shown_status(run),  # type: ignore[arg-type]
        logs=trainer_lines(
            logs if logs is not None else tail_lines(folder.log, _LOG_SCAN_LINES), STATUS_LOG_LINES
        ),
        progress=progress,
        outputs=outputs_of(folder, run.output_name, final_epoch),
        error=run.error,
        waiting=_waiting(run),
        warnings=lint_warnings_of(folder),
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        best_checkpoint=finished.get("best_checkpoint") if finished else None,
    )
