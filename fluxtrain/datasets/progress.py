"""Counts of the downloads running in this process, by dataset, for `GET /datasets/{name}/downloads`.

A download registers itself when it starts and is gone when it ends; only this process's
downloads are seen (one service process, or the process that runs the CLI).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(eq=False)
class DownloadProgress:
    """One running download: its distinct URLs and how many have been saved or have failed."""

    name: str
    total: int
    saved: int = 0
    failed: int = 0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.saved + self.failed

    @property
    def images_per_s(self) -> float:
        """Saved images per second since the download started."""
        elapsed = time.monotonic() - self._started
        return self.saved / elapsed if elapsed > 0 else 0.0

    def record(self, *, saved: bool) -> None:
        if saved:
            self.saved += 1
        else:
            self.failed += 1


_RUNNING: dict[str, list[DownloadProgress]] = {}
_LOCK = threading.Lock()


def start(name: str, total: int) -> DownloadProgress:
    """Register a download of `total` distinct URLs into dataset `name`."""
    progress = DownloadProgress(name=name, total=total)
    with _LOCK:
        _RUNNING.setdefault(name, []).append(progress)
    return progress


def finish(progress: DownloadProgress) -> None:
    with _LOCK:
        running = _RUNNING.get(progress.name, [])
        if progress in running:
            running.remove(progress)
        if not running:
            _RUNNING.pop(progress.name, None)


def running(name: str) -> list[DownloadProgress]:
    """The downloads into dataset `name` running now, oldest first."""
    with _LOCK:
        return list(_RUNNING.get(name, []))
