"""Server-Sent Events of a run: every line of its events file as it is written, then the final status.

Each line's SSE id is its line number (from 1), so a client that reconnects with
`Last-Event-ID: N` continues at line N + 1 and misses nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.sse import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from fluxtrain.errors import InvalidInputError
from fluxtrain.rundir import RunDir
from fluxtrain.runs.db import Database
from fluxtrain.runs.service import get_run
from fluxtrain.runs.status import build_status, run_dir
from fluxtrain.runs.table import TERMINAL_STATUSES
from fluxtrain.settings import Settings

POLL_SECONDS = 0.5
MAX_READ = 1 << 20


def parse_last_event_id(value: str | None) -> int:
    """The line number a reconnecting client saw last; 0 for a new client."""
    if value is None or value.strip() == "":
        return 0
    try:
        number = int(value.strip())
    except ValueError as exc:
        raise InvalidInputError("Last-Event-ID must be a line number") from exc
    if number < 0:
        raise InvalidInputError("Last-Event-ID must not be negative")
    return number


class _LineReader:
    """Reads complete lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = b""

    def read(self) -> list[str]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(MAX_READ)
        self.offset += len(chunk)
        data = self.pending + chunk
        *lines, self.pending = data.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in lines]


async def run_events(
    *, settings: Settings, db: Database, run_id: str, after: int = 0
) -> AsyncIterator[ServerSentEvent]:
    """Follow a run until it ends; the status is read before the file so no last line is lost."""
    reader = _LineReader(RunDir(run_dir(settings, run_id)).events)
    number = 0
    while True:
        run = await run_in_threadpool(get_run, db=db, run_id=run_id)
        ended = run.status in TERMINAL_STATUSES
        while lines := await run_in_threadpool(reader.read):
            for line in lines:
                number += 1
                if number > after and line.strip():
                    yield ServerSentEvent(raw_data=line, id=str(number))
        if ended:
            status = build_status(settings, run)
            yield ServerSentEvent(raw_data=json.dumps(status.model_dump(mode="json")), event="status")
            return
        await asyncio.sleep(POLL_SECONDS)
