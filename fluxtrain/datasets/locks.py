"""One lock per dataset, held across threads and processes (the CLI writing beside the service).

The lock is an flock on `$DATA_ROOT/.locks/<name>.lock`, outside `datasets/`, so that folder
keeps holding only the users' data and TOML files (other tools read it), and so deleting a dataset
never deletes the lock a waiting writer is about to take. A thread lock per file sits in front of the
flock, so threads of one process exclude each other even where flock is emulated per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


LOCKS_DIR = ".locks"


def lock_path(folder: Path) -> Path:
    """The lock file of the dataset in `folder` (`$DATA_ROOT/datasets/<name>`)."""
    return folder.parent.parent / LOCKS_DIR / f"{folder.name}.lock"


def _thread_lock(path: Path) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.Lock())


@contextlib.contextmanager
def dataset_lock(folder: Path) -> Iterator[None]:
    """Hold the dataset's lock while naming, renaming, recording or deleting; blocks until free."""
    path = lock_path(folder)
    with _thread_lock(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
