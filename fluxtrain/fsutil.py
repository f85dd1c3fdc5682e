"""Atomic file writes (readers see the old file or the new one, never a partial one) and tail reads.

A write in progress is a hidden file ending in TEMPORARY_SUFFIX beside its target; one that a
killed process left behind is removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"
STALE_TEMPORARY_SECONDS = 3600.0


def is_temporary_name(name: str) -> bool:
    """Whether `name` is a write in progress: hidden and ending in TEMPORARY_SUFFIX."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def remove_stale_temporaries(folder: Path, *, older_than: float = STALE_TEMPORARY_SECONDS) -> int:
    """Delete the writes in progress in `folder` that nobody touched for `older_than` seconds; how many.

    A writer renames its file within seconds, so an hour-old one was left by a process killed
    mid-write. Age, not process ids, tells them apart: the folder may be shared with other
    processes and machines. Only regular files are removed (a link is never followed).
    """
    cutoff = time.time() - older_than
    removed = 0
    try:
        entries = os.scandir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    with entries:
        for entry in entries:
            if not is_temporary_name(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    if removed:
        logger.info("removed %d stale temporary file(s) from %s", removed, folder)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a hidden temporary file in the same folder, fsync, then rename over `path`.

    mkstemp creates files readable by the owner alone; results are meant to be shared, so 0644.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def tail_lines(path: Path, count: int, *, block: int = 65536) -> list[str]:
    """The last `count` lines of a text file, read from its end."""
    if count <= 0 or not path.is_file():
        return []
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return list(deque(lines, maxlen=count))
