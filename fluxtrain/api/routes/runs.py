"""Training runs over HTTP: start (`/train`), watch (`/status`, events, logs), list, cancel, download."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from fluxtrain.api.deps import SettingsDep
from fluxtrain.errors import InvalidInputError, NotFoundError
from fluxtrain.fsutil import tail_lines
from fluxtrain.names import check_name
from fluxtrain.runs import service
from fluxtrain.runs.db import Database, get_database
from fluxtrain.runs.launcher import LOG_NAME
from fluxtrain.runs.models import TERMINAL_STATUSES
from fluxtrain.runs.schemas import (
    Artifact,
    ArtifactList,
    LogLines,
    RunList,
    RunStatus,
    RunStatusOut,
    TrainRequest,
    TrainStarted,
)
from fluxtrain.runs.sse import parse_last_event_id, run_events
from fluxtrain.runs.status import build_status, lora_files, remote_urls, run_dir
from fluxtrain.settings import Settings

router = APIRouter(tags=["runs"])

SAMPLE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MAX_TAIL = 10_000
MAX_LOG_CHUNK = 1 << 20


def _database(settings: SettingsDep) -> Database:
    return get_database(settings)


DatabaseDep = Annotated[Database, Depends(_database)]


@router.post("/train", response_model=TrainStarted)
def train(
    request: TrainRequest,  # type: ignore[valid-type]
    settings: SettingsDep,
    db: DatabaseDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> TrainStarted:
    """Check everything, then queue the run; the executor starts it as soon as a device is free."""
    run = service.create_run(settings=settings, db=db, request=request, idempotency_key=idempotency_key)
    return TrainStarted(run_id=run.id)


@router.get("/status/{run_id}", response_model=RunStatusOut)
def status(run_id: str, settings: SettingsDep, db: DatabaseDep) -> RunStatusOut:
    """Where a run stands: status, progress, last log lines, LoRA files written so far."""
    return build_status(settings, service.get_run(db=db, run_id=run_id))


@router.get("/runs", response_model=RunList)
def runs(
    settings: SettingsDep,
    db: DatabaseDep,
    status: RunStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_LIST_LIMIT)] = 100,
) -> RunList:
    """Every run, newest first."""
    found = service.list_runs(db=db, status=status, limit=limit)
    return RunList(runs=[build_status(settings, run) for run in found])


@router.post("/runs/{run_id}/cancel", response_model=RunStatusOut)
def cancel(run_id: str, settings: SettingsDep, db: DatabaseDep) -> RunStatusOut:
    """Drop a queued run, or stop a running one (it saves its state first)."""
    return build_status(settings, service.cancel_run(db=db, run_id=run_id))


def _stream_start(
    run_id: str,
    db: DatabaseDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> int:
    """Checked before the stream opens, so an unknown run or a bad header still gets its 404/422."""
    after = parse_last_event_id(last_event_id)
    service.get_run(db=db, run_id=run_id)
    return after


@router.get("/runs/{run_id}/events", response_class=EventSourceResponse)
async def events(
    run_id: str,
    settings: SettingsDep,
    db: DatabaseDep,
    after: Annotated[int, Depends(_stream_start)],
) -> AsyncIterator[ServerSentEvent]:
    """Every progress event as the trainer writes it, then one `status` event; resumable."""
    async for event in run_events(settings=settings, db=db, run_id=run_id, after=after):
        yield event


def _log_from(path: Path, offset: int, *, ended: bool) -> tuple[list[str], int]:
    """Whole lines after `offset`; once the run has ended its unterminated last line counts too."""
    if not path.is_file():
        return [], 0
    size = path.stat().st_size
    start = min(offset, size)
    with path.open("rb") as handle:
        handle.seek(start)
        chunk = handle.read(MAX_LOG_CHUNK)
    at_end = start + len(chunk) >= size
    complete = chunk if ended and at_end else chunk[: chunk.rfind(b"\n") + 1]
    text = complete.decode("utf-8", errors="replace")
    return text.splitlines(), start + len(complete)


@router.get("/runs/{run_id}/logs", response_model=LogLines)
def logs(
    run_id: str,
    settings: SettingsDep,
    db: DatabaseDep,
    tail: Annotated[int, Query(ge=1, le=MAX_TAIL)] = 100,
    offset: Annotated[int | None, Query(ge=0, description="Byte offset to follow the log from.")] = None,
) -> LogLines:
    """The trainer's log: its last `tail` lines, or everything after `offset` to follow it."""
    run = service.get_run(db=db, run_id=run_id)
    path = run_dir(settings, run.id) / LOG_NAME
    if offset is not None:
        lines, next_offset = _log_from(path, offset, ended=run.status in TERMINAL_STATUSES)
        return LogLines(run_id=run.id, lines=lines, next_offset=next_offset)
    size = path.stat().st_size if path.is_file() else 0
    return LogLines(run_id=run.id, lines=tail_lines(path, tail), next_offset=size)


def _artifacts(settings: Settings, run_id: str) -> dict[str, tuple[Path, str]]:
    folder = run_dir(settings, run_id)
    found = {path.name: (path, "lora") for path in lora_files(folder)}
    samples = folder / "samples"
    if samples.is_dir():
        for path in sorted(samples.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in SAMPLE_SUFFIXES:
                found.setdefault(path.name, (path, "sample"))
    return found


@router.get("/runs/{run_id}/artifacts", response_model=ArtifactList)
def artifacts(run_id: str, settings: SettingsDep, db: DatabaseDep) -> ArtifactList:
    """LoRA files and samples a run has written, with their remote URLs once uploaded."""
    run = service.get_run(db=db, run_id=run_id)
    urls = remote_urls(run_dir(settings, run.id))
    files = [
        Artifact(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            size=path.stat().st_size,
            url=urls.get(f"{'output' if kind == 'lora' else 'samples'}/{name}"),
        )
        for name, (path, kind) in _artifacts(settings, run.id).items()
    ]
    return ArtifactList(run_id=run.id, files=files)


@router.get("/runs/{run_id}/artifacts/{name:path}", response_class=FileResponse)
def artifact(run_id: str, name: str, settings: SettingsDep, db: DatabaseDep) -> FileResponse:
    """Download one LoRA file or sample image by its name (a bare file name: no folders, no '..')."""
    run = service.get_run(db=db, run_id=run_id)
    try:
        check_name(name, what="artifact name")
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    found = _artifacts(settings, run.id).get(name)
    if found is None:
        raise NotFoundError(f"run '{run.id}' has no artifact '{name}'")
    return FileResponse(found[0], filename=name)
