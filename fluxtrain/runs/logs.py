"""A run's trainer log as `/runs/{id}/logs` serves it: the last lines, or what follows an offset."""

from __future__ import annotations

from pathlib import Path

from fluxtrain.fsutil import tail_lines
from fluxtrain.rundir import RunDir
from fluxtrain.runs.schemas import LogLines
from fluxtrain.runs.status import run_dir
from fluxtrain.runs.table import TERMINAL_STATUSES, Run
from fluxtrain.settings import Settings

MAX_LOG_CHUNK = 1 << 20


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


def read_log(*, settings: Settings, run: Run, tail: int, offset: int | None = None) -> LogLines:
    """The last `tail` lines, or, given `offset`, the whole lines written since (at most 1 MiB)."""
    path = RunDir(run_dir(settings, run.id)).log
    if offset is not None:
        lines, next_offset = _log_from(path, offset, ended=run.status in TERMINAL_STATUSES)
        return LogLines(run_id=run.id, lines=lines, next_offset=next_offset)
    size = path.stat().st_size if path.is_file() else 0
    return LogLines(run_id=run.id, lines=tail_lines(path, tail), next_offset=size)
