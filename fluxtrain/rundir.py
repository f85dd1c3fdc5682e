"""The run directory: the one place that names its files and writes and reads its events.

The runs layer and the trainer share nothing but this folder (docs/architecture.md lists what
each file holds); every reader and writer goes through here, so a file name or the event format
changes in one place.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrain.fsutil import atomic_write_json, tail_lines

LORA_SUFFIX = ".safetensors"
SAMPLE_SUFFIX = ".png"
CONTACT_SHEET_SUFFIX = "-grid.jpg"
REJECTED_SUFFIX = ".rejected"
RECENT_EVENTS = 400


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; nothing is created by naming them."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        """The resolved training config, written by `runs` and read by the trainer."""
        return self.root / "run.json"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def log(self) -> Path:
        """The trainer process's stdout and stderr."""
        return self.root / "train.log"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def state(self) -> Path:
        """Resumable training state, saved at the end of a stopped run."""
        return self.root / "state"

    @property
    def uploads(self) -> Path:
        """Remote URLs of uploaded artifacts, keyed by `key()`."""
        return self.root / "uploads.json"

    @property
    def upload_state(self) -> Path:
        """The uploader's own bookkeeping."""
        return self.root / "uploads-state.json"

    @property
    def removed(self) -> Path:
        """Artifacts the trainer deleted on purpose (keep_best_only), whose remote copies go too."""
        return self.root / "removed.json"

    @property
    def lint_warnings(self) -> Path:
        """The dataset lint's warnings at `/train`, written once by `runs` when the run is created."""
        return self.root / "lint-warnings.json"

    @property
    def artifact_dirs(self) -> tuple[Path, ...]:
        """Folders whose finished files are copied to remote storage."""
        return (self.output, self.samples)

    def checkpoint(self, output_name: str, epoch: int | None) -> Path:
        return self.output / checkpoint_name(output_name, epoch)

    def sample(self, output_name: str, *, step: int, index: int) -> Path:
        return self.samples / sample_name(output_name, step=step, index=index)

    def contact_sheet(self, output_name: str) -> Path:
        """The grid of every sample, one row per prompt and one column per sampled step."""
        return self.samples / contact_sheet_name(output_name)

    def key(self, path: Path) -> str:
        """A file's path inside the run directory, '/'-separated: `output/x.safetensors`."""
        return path.relative_to(self.root).as_posix()

    def lora_files(self) -> list[Path]:
        """Finished LoRA files in `output/` (hidden names are files still being written)."""
        if not self.output.is_dir():
            return []
        return sorted(
            p for p in self.output.glob(f"*{LORA_SUFFIX}") if p.is_file() and not p.name.startswith(".")
        )

    def removed_keys(self) -> set[str]:
        """`removed.json`: the `key()`s of artifacts deleted on purpose; empty when none was."""
        try:
            data = json.loads(self.removed.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        return {str(key) for key in data} if isinstance(data, list) else set()

    def note_removed(self, paths: list[Path]) -> None:
        """Add deleted artifacts to `removed.json` (the trainer's main process is its only writer)."""
        if paths:
            atomic_write_json(self.removed, sorted(self.removed_keys() | {self.key(p) for p in paths}))

    def uploaded_urls(self) -> dict[str, str]:
        """`uploads.json`: remote URLs keyed by `key()`; empty before the first upload."""
        try:
            data = json.loads(self.uploads.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, str)}


def checkpoint_name(output_name: str, epoch: int | None) -> str:
    """`<name>-000001.safetensors` after an epoch, `<name>.safetensors` for the final LoRA."""
    if epoch is None:
        return f"{output_name}{LORA_SUFFIX}"
    return f"{output_name}-{epoch:06d}{LORA_SUFFIX}"


def parse_checkpoint_name(file_name: str, output_name: str) -> int | None:
    """The epoch of an epoch checkpoint of `output_name`; None for the final file or another name."""
    match = re.fullmatch(re.escape(output_name) + r"-(\d{6})" + re.escape(LORA_SUFFIX), file_name)
    return int(match.group(1)) if match else None


def sample_name(output_name: str, *, step: int, index: int) -> str:
    """`<name>_000010_00.png`: the step it was rendered after and its prompt's index."""
    return f"{output_name}_{step:06d}_{index:02d}{SAMPLE_SUFFIX}"


def parse_sample_name(file_name: str, output_name: str) -> tuple[int, int] | None:
    """`(step, index)` of a sample of `output_name`; None for any other name."""
    pattern = re.escape(output_name) + r"_(\d{6,})_(\d{2,})" + re.escape(SAMPLE_SUFFIX)
    match = re.fullmatch(pattern, file_name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def contact_sheet_name(output_name: str) -> str:
    """`<name>-grid.jpg`: a JPEG, so `parse_sample_name` (PNG only) never takes it for a sample."""
    return f"{output_name}{CONTACT_SHEET_SUFFIX}"


def rejected_lora(lora: Path) -> Path:
    """Where a LoRA file that failed its load check is kept: hidden, so never listed or uploaded."""
    return lora.with_name(f".{lora.name}{REJECTED_SUFFIX}")


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


def event_line(event: str, **fields: Any) -> bytes:
    """One event as its line: `event` and wall-clock `time` first, non-finite floats as null."""
    record = {"event": event, "time": round(time.time(), 3), **_jsonable(fields)}
    return (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")


_thread_locks_guard = threading.Lock()
_thread_locks: dict[Path, threading.Lock] = {}


def _thread_lock(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(path.resolve(), threading.Lock())


def _write_line(fd: int, path: Path, line: bytes) -> None:
    """Append under a thread lock and an exclusive flock, so lines of the trainer, the uploader's
    threads and other processes never interleave; fsync so a reader never sees half a line."""
    with _thread_lock(path):
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _open_append(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class EventWriter:
    """Appends events to one `events.jsonl`; a disabled writer (other ranks) writes nothing."""

    def __init__(self, path: Path, *, enabled: bool = True) -> None:
        self.path = path
        self._fd: int | None = _open_append(path) if enabled else None

    def emit(self, event: str, **fields: Any) -> None:
        if self._fd is not None:
            _write_line(self._fd, self.path, event_line(event, **fields))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append_event(path: Path, event: str, **fields: Any) -> None:
    """Append one event, opening and closing the file: for writers that emit now and then."""
    fd = _open_append(path)
    try:
        _write_line(fd, path, event_line(event, **fields))
    finally:
        os.close(fd)


def parse_event(line: str) -> dict[str, Any] | None:
    """The event on one line; None for a partial, foreign or unreadable line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("event"), str) else None


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event, oldest first."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", errors="replace") as handle:
        return [record for line in handle if (record := parse_event(line)) is not None]


def recent_events(path: Path, count: int = RECENT_EVENTS) -> list[dict[str, Any]]:
    """The complete events among the last `count` lines, oldest first."""
    records = (parse_event(line) for line in tail_lines(path, count))
    return [record for record in records if record is not None]


def first_event(path: Path, kind: str, *, scan: int = 50) -> dict[str, Any] | None:
    """The first `kind` event among the first `scan` lines (`started` comes early)."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as handle:
        for _, line in zip(range(scan), handle, strict=False):
            record = parse_event(line)
            if record is not None and record["event"] == kind:
                return record
    return None
