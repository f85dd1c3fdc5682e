"""A download's manifest commits, handed to a thread a batch at a time.

Naming a finished file and recording its manifest entry block (the dataset's lock is an flock
another process may hold), so they run off the event loop; but one thread hand-off and one hold
of the lock per image cost the loop more than moving the image's bytes. So a batch is
every image that finished within BATCH_WINDOW of the first, or while the previous batch was
committing: one hand-off and one hold of the lock for all of them, for at most 20 ms of delay.
The download's last image does not wait out the window: the committer knows how many images to
expect, less those whose URL failed before reaching it (`skip`), so a batch of ten that finishes in
9 ms returns then, not 20 ms later.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from pathlib import Path

from fluxtrain.datasets.ledger import Incoming, Ledger

BATCH_WINDOW = 0.02


class Committer:
    """Commits into one ledger, in arrival order, from one event loop."""

    def __init__(self, book: Ledger, executor: Executor, *, expected: int) -> None:
        self._book = book
        self._executor = executor
        self._lock = threading.Lock()
        self._pending: list[tuple[Incoming, asyncio.Future[Path]]] = []
        self._draining = False
        self._left = expected
        self._window: asyncio.TimerHandle | None = None

    async def commit(self, item: Incoming) -> Path:
        """The image's final path once it is named and recorded (its errors raise here)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Path] = loop.create_future()
        with self._lock:
            self._pending.append((item, future))
            start, self._draining = not self._draining, True
        if start:
            self._window = loop.call_later(BATCH_WINDOW, self._start, loop)
        self._arrived(loop)
        return await future

    def skip(self) -> None:
        """One expected image will not come (its URL failed before it got here)."""
        self._arrived(asyncio.get_running_loop())

    def _arrived(self, loop: asyncio.AbstractEventLoop) -> None:
        self._left -= 1
        if self._left <= 0 and self._window is not None:
            self._window.cancel()
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._window = None
        loop.run_in_executor(self._executor, self._drain, loop)

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            try:
                outcomes: list[Path | Exception] = self._book.commit_files([item for item, _ in batch])
            except Exception as exc:
                outcomes = [exc] * len(batch)
            try:
                loop.call_soon_threadsafe(_deliver, batch, outcomes)
            except RuntimeError:
                return


def _deliver(batch: list[tuple[Incoming, asyncio.Future[Path]]], outcomes: list[Path | Exception]) -> None:
    for (_, future), outcome in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
