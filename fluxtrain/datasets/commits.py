"""A download's manifest commits, handed to a thread a batch at a time.

Naming a finished file and recording its manifest entry block (the dataset's lock is an flock
another process may hold), so they run off the event loop; but one thread hand-off and one hold
of the lock per image cost the loop more than moving the image's bytes. So a batch is
every image that finished within BATCH_WINDOW of the first, or while the previous batch was
committing: one hand-off and one hold of the lock for all of them, for at most 20 ms of delay.
The download's last image does not wait out the window: the committer knows how many images to
expect, less those whose URL failed before reaching it (`skip`), so a batch of ten that finishes in
9 ms returns then, not 20 ms later.

A commit's outcome goes to a callback, not to an awaited future: the task that fetched the image
moves on to its next URL at once instead of waiting out the window, and no future or task wake-up
is spent per image. `settled` waits for every outcome; `close` commits what is pending at once,
waits for the thread, and calls no callback after it (a download that was cancelled or failed
reports nothing more, and its ledger is released only once the thread is done with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from fluxtrain.datasets.ledger import Incoming, Ledger

BATCH_WINDOW = 0.02

Done = Callable[[Path | Exception], None]


class Committer:
    """Commits into one ledger, in arrival order, from the event loop that creates it."""

    def __init__(self, book: Ledger, executor: Executor, *, expected: int) -> None:
        self._book = book
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._pending: list[tuple[Incoming, Done]] = []
        self._draining = False
        self._left = expected
        self._unsettled = expected
        self._window: asyncio.TimerHandle | None = None
        self._settled: asyncio.Future[None] = self._loop.create_future()
        self._callback_error: BaseException | None = None
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        if expected <= 0:
            self._settled.set_result(None)

    def commit(self, item: Incoming, done: Done) -> None:
        """Name and record `item`; `done` gets its final path, or the error, on the event loop."""
        with self._lock:
            self._pending.append((item, done))
            start, self._draining = not self._draining, True
        if start:
            self._idle.clear()
            self._window = self._loop.call_later(BATCH_WINDOW, self._start)
        self._arrived()

    def skip(self) -> None:
        """One expected image will not come (its URL failed before it got here)."""
        self._arrived()
        self._settle(1)

    async def settled(self) -> None:
        """Wait until every expected image was committed (or skipped); a callback's error raises here."""
        await self._settled
        if self._callback_error is not None:
            raise self._callback_error

    async def close(self) -> None:
        """Commit what is pending now, wait until the thread is done, and call no callback after."""
        self._closed = True
        if self._window is not None:
            self._window.cancel()
            self._start()
        await self._idle.wait()

    def _arrived(self) -> None:
        self._left -= 1
        if self._left <= 0 and self._window is not None:
            self._window.cancel()
            self._start()

    def _settle(self, count: int) -> None:
        self._unsettled -= count
        if self._unsettled <= 0 and not self._settled.done():
            self._settled.set_result(None)

    def _start(self) -> None:
        self._window = None
        self._loop.run_in_executor(self._executor, self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    with contextlib.suppress(RuntimeError):
                        self._loop.call_soon_threadsafe(self._became_idle)
                    return
            try:
                outcomes: list[Path | Exception] = self._book.commit_files([item for item, _ in batch])
            except Exception as exc:
                outcomes = [exc] * len(batch)
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch, outcomes)
            except RuntimeError:
                return

    def _became_idle(self) -> None:
        with self._lock:
            if not self._draining:
                self._idle.set()

    def _deliver(self, batch: list[tuple[Incoming, Done]], outcomes: list[Path | Exception]) -> None:
        try:
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                if self._closed:
                    break
                try:
                    done(outcome)
                except Exception as exc:
                    self._callback_error = self._callback_error or exc
        finally:
            self._settle(len(batch))
