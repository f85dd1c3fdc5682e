"""The status object of a run: its row, the tail of `events.jsonl` and `train.log`, and `output/`."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fluxtrain.runs.launcher import LOG_NAME, tail_lines
from fluxtrain.runs.models import Run
from fluxtrain.runs.schemas import OutputFile, Progress, RunStatusOut
from fluxtrain.settings import Settings

EVENTS_NAME = "events.jsonl"
UPLOADS_NAME = "uploads.json"
STATUS_LOG_LINES = 10
_EVENT_SCAN_LINES = 400
_NUMBERED = re.compile(r"-(\d{6})$")


def run_dir(settings: Settings, run_id: str) -> Path:
    return settings.runs_dir / run_id


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("event"), str) else None


def recent_events(folder: Path, count: int = _EVENT_SCAN_LINES) -> list[dict[str, Any]]:
    """The last `count` complete events of a run, oldest first."""
    records = (_parse(line) for line in tail_lines(folder / EVENTS_NAME, count))
    return [record for record in records if record is not None]


def first_event(folder: Path, kind: str, *, scan: int = 50) -> dict[str, Any] | None:
    path = folder / EVENTS_NAME
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as handle:
        for _, line in zip(range(scan), handle, strict=False):
            record = _parse(line)
            if record is not None and record["event"] == kind:
                return record
    return None


def last_event(events: list[dict[str, Any]], *kinds: str) -> dict[str, Any] | None:
    return next((e for e in reversed(events) if e["event"] in kinds), None)


def _number(record: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if record is not None and isinstance(record.get(key), int | float):
            return record[key]
    return None


def progress_of(folder: Path, events: list[dict[str, Any]]) -> Progress:
    step = last_event(events, "step")
    started = first_event(folder, "started")
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
    )


def remote_urls(folder: Path) -> dict[str, str]:
    """URLs of uploaded artifacts, keyed by their path inside the run folder."""
    path = folder / UPLOADS_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def lora_files(folder: Path) -> list[Path]:
    output = folder / "output"
    if not output.is_dir():
        return []
    return sorted(p for p in output.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))


def outputs_of(folder: Path, output_name: str, final_epoch: int | None) -> list[OutputFile]:
    urls = remote_urls(folder)
    files = []
    for path in lora_files(folder):
        match = _NUMBERED.search(path.stem)
        epoch = int(match.group(1)) if match else (final_epoch if path.stem == output_name else None)
        files.append(
            OutputFile(name=path.name, path=str(path), epoch=epoch, url=urls.get(f"output/{path.name}"))
        )
    files.sort(key=lambda f: (f.name == f"{output_name}.safetensors", f.epoch or 0, f.name))
    return files


def final_lora(folder: Path, output_name: str) -> Path:
    return folder / "output" / f"{output_name}.safetensors"


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


def build_status(settings: Settings, run: Run, *, logs: list[str] | None = None) -> RunStatusOut:
    """The `/status` object; `logs` comes from the backend when it keeps them elsewhere."""
    folder = run_dir(settings, run.id)
    events = recent_events(folder)
    progress = progress_of(folder, events)
    finished = last_event(events, "finished")
    final_epoch = _number(finished, "epoch") or progress.total_epochs or progress.epoch or None
    return RunStatusOut(
        run_id=run.id,
        status=shown_status(run),  # type: ignore[arg-type]
        logs=logs if logs is not None else tail_lines(folder / LOG_NAME, STATUS_LOG_LINES),
        progress=progress,
        outputs=outputs_of(folder, run.output_name, final_epoch),
        error=run.error,
        waiting=_waiting(run),
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )
