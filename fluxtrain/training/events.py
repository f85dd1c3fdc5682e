"""The run's progress as `events.jsonl`: one JSON object a line, flushed as it happens.

The runs layer tails this file for status, so each line is complete when written and carries
an `event` field (started, caching, step, sample, checkpoint, interrupted, finished, error) and
the wall-clock `time`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class EventLog:
    """Appends events to `events.jsonl`; a disabled log (other ranks) writes nothing."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = path
        self._handle: TextIO | None = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("a", encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> None:
        """Write one event line and push it to disk so a reader never sees half a line."""
        if self._handle is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **_jsonable(fields)}
        self._handle.write(json.dumps(record, sort_keys=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_events(path: Path) -> list[dict[str, Any]]:
    """All complete events in a run's log, oldest first."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            events.append(json.loads(line))
    return events
