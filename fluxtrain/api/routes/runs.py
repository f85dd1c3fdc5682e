"""Training runs over HTTP: start (`/train`), watch (`/status`, events, logs), list, cancel, download."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from fluxtrain.api.deps import SettingsDep
from fluxtrain.runs import service
from fluxtrain.runs.artifacts import artifact_path, list_artifacts, write_run_contact_sheet
from fluxtrain.runs.db import Database, get_database
from fluxtrain.runs.logs import read_log
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
from fluxtrain.runs.status import build_status

router = APIRouter(tags=["runs"])

MAX_TAIL = 10_000


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


@router.get("/runs/{run_id}/logs", response_model=LogLines)
def logs(
    run_id: str,
    settings: SettingsDep,
    db: DatabaseDep,
    tail: Annotated[int, Query(ge=1, le=MAX_TAIL)] = 100,
    offset: Annotated[int | None, Query(ge=0, description="Byte offset to follow the log from.")] = None,
) -> LogLines:
    """The trainer's log: its last `tail` lines, or everything after `offset` to follow it."""
    return read_log(settings=settings, run=service.get_run(db=db, run_id=run_id), tail=tail, offset=offset)


@router.get("/runs/{run_id}/artifacts", response_model=ArtifactList)
def artifacts(run_id: str, settings: SettingsDep, db: DatabaseDep) -> ArtifactList:
    """LoRA files and samples a run has written, with their remote URLs once uploaded."""
    return list_artifacts(settings=settings, run=service.get_run(db=db, run_id=run_id))


@router.post("/runs/{run_id}/contact-sheet", response_model=Artifact)
def contact_sheet(run_id: str, settings: SettingsDep, db: DatabaseDep) -> Artifact:
    """Write the run's contact sheet now: a row per prompt, a column per sampled step; 409 without samples."""
    return write_run_contact_sheet(settings=settings, run=service.get_run(db=db, run_id=run_id))


@router.get("/runs/{run_id}/artifacts/{name:path}", response_class=FileResponse)
def artifact(run_id: str, name: str, settings: SettingsDep, db: DatabaseDep) -> FileResponse:
    """Download one LoRA file or sample image by its name (a bare file name: no folders, no '..')."""
    run = service.get_run(db=db, run_id=run_id)
    return FileResponse(artifact_path(settings=settings, run=run, name=name), filename=name)
