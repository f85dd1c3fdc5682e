"""Image work on every core: decoding, colour conversion, JPEG encoding and hashing in worker processes.

Threads could not do this: the Python parts of Pillow's pipeline hold the GIL. Nor could
`ProcessPoolExecutor`: its feeder and result threads need the GIL for every job, and a busy event
loop holds it for up to the 5 ms switch interval, so workers sat idle between jobs; and its
forked workers re-ran the parent's `__main__` (under the `fluxtrain` console script: torch and
transformers, 1.7 s and 260 MB a worker).

So each worker is a fresh interpreter (`image_worker`, Pillow only: tens of MB, a fraction of a
second to start) on one end of a socket pair, and the event loop itself writes jobs into that
socket and reads the answers, with no thread in between. A worker holds up to DEPTH jobs (one
running, the next already in its socket), so it never waits for the loop between two. A worker
is held by one event loop while it has jobs out; the pool serves any loop (the service's, or a
CLI's `asyncio.run`). A body goes from the fetch's buffer into the socket uncopied (`image_worker`
says how); the worker writes the JPEG into the dataset folder under a temporary name and answers
only that name.

A worker that dies fails no job by itself: the jobs it had not started go to the other workers,
and the one it was running runs again alone in a process of its own, so only an image that kills
its process fails, with WorkerCrashedError. Workers run `image_worker.NICENESS` steps below the
service, so the event loop and the API get a core first.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from fluxtrain.datasets.image_worker import LENGTH, decode, encode, encode_job, frame_length
from fluxtrain.datasets.images import NormalizedImage, Stored, normalize_image
from fluxtrain.datasets.ledger import DatasetDeletedError, write_incoming
from fluxtrain.settings import child_environment

T = TypeVar("T")
logger = logging.getLogger(__name__)

DEPTH = 2
READY = ("ready",)
START_TIMEOUT = 120.0
# A typical body fits a worker's socket whole, so it goes in with one write, not a write per
# 200 KB woken by the worker's reads (the kernel caps this at net.core.wmem_max).
SOCKET_BUFFER_BYTES = 4 << 20


class WorkerCrashedError(Exception):
    """The image made its worker process die (a crash in a decoder); the image is refused."""

    def __init__(self) -> None:
        super().__init__("refused: decoding the image crashed its worker process")


@dataclass(frozen=True)
class Prepared:
    """One body's normalised JPEG and the body's hash and size."""

    image: NormalizedImage
    sha256: str
    size: int

    def manifest_entry(self) -> dict[str, object]:
        image = self.image
        return _entry(self.sha256, self.size, image.width, image.height, image.stored)


class Written(NamedTuple):
    """What a worker hands back: the temporary file holding the JPEG, never the JPEG's bytes.

    A tuple of plain values, since it crosses the process boundary once per image: a frozen
    dataclass holding a Path took 15 us to frame and read back, this takes 5."""

    incoming: str
    width: int
    height: int
    stored: Stored
    sha256: str
    size: int

    def manifest_entry(self) -> dict[str, object]:
        return _entry(self.sha256, self.size, self.width, self.height, self.stored)


def _entry(sha256: str, size: int, width: int, height: int, stored: Stored) -> dict[str, object]:
    """An image's manifest fields besides its source."""
    return {"sha256": sha256, "bytes": size, "width": width, "height": height, "stored": stored}


def prepare(data: bytes, max_pixels: int) -> Prepared:
    """Normalise and hash one downloaded body; runs in a worker process."""
    return Prepared(
        image=normalize_image(data, max_pixels=max_pixels),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def prepare_into(folder: str, data: bytes, max_pixels: int) -> Written:
    """Normalise and hash one downloaded body and write its JPEG into `folder`; runs in a worker.

    A vanished folder is answered with FileNotFoundError (the caller's DatasetDeletedError), which
    crosses the process boundary intact.
    """
    prepared = prepare(data, max_pixels)
    try:
        incoming = write_incoming(Path(folder), prepared.image.jpeg)
    except DatasetDeletedError as exc:
        raise FileNotFoundError(str(folder)) from exc
    image = prepared.image
    return Written(str(incoming), image.width, image.height, image.stored, prepared.sha256, prepared.size)


class _Gone(Exception):
    """The worker's end of the socket closed: the process died or was stopped."""


class _WorkerDied(Exception):
    def __init__(self, *, running: bool) -> None:
        super().__init__("the worker process died")
        self.running = running


@dataclass(eq=False)
class _Job:
    message: list[bytes]
    future: asyncio.Future[Any]
    abandoned: Callable[[Any], object] | None = None


@dataclass(eq=False)
class _Worker:
    """One worker process; while it has jobs out, the event loop holding it reads and writes its
    socket through `add_reader` / `add_writer` callbacks (no task, no thread)."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    ready: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    starting: bool = False
    dead: bool = False
    sent: deque[_Job] = field(default_factory=deque)
    outbox: deque[memoryview] = field(default_factory=deque)
    waiting_to_write: bool = False
    inbox: bytearray = field(default_factory=bytearray)

    @classmethod
    def spawn(cls) -> _Worker:
        ours, theirs = socket.socketpair()
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "fluxtrain.datasets.image_worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=child_environment(),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        for part in encode(sys.path):
            ours.sendall(part)
        ours.setblocking(False)
        return cls(process=process, sock=ours)

    def wait_ready(self, deadline: float) -> None:
        """Block until the worker says it is ready (start-up, off any event loop)."""
        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("an image worker did not start in time")
            if self.take_messages() != []:
                raise _Gone

    def take_messages(self) -> list[Any]:
        """Read what the socket holds and return the answers complete in it (READY is noted, not
        returned); _Gone at the end of the stream."""
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise _Gone from exc
        if not data:
            raise _Gone
        self.inbox += data
        messages = []
        start = 0
        with memoryview(self.inbox) as view:
            while (left := len(view) - start) >= LENGTH.size and left >= (
                length := frame_length(view[start:])
            ):
                message = _read_answer(view[start + LENGTH.size : start + length])
                start += length
                if message == READY:
                    self.ready = True
                else:
                    messages.append(message)
        del self.inbox[:start]
        return messages

    def send(self, message: list[bytes]) -> None:
        """Queue a frame's parts after what is queued; write what the socket takes now."""
        idle = not self.outbox
        self.outbox.extend(memoryview(part) for part in message)
        if idle:
            self.flush()

    def flush(self) -> None:
        """Write queued bytes until the socket is full (one `sendmsg` for all the parts it takes);
        ask the loop to call again when it drains."""
        assert self.loop is not None
        while self.outbox:
            try:
                written = self.sock.sendmsg(self.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.outbox.clear()
                break
            if not written:
                break
            while written and written >= len(self.outbox[0]):
                written -= len(self.outbox.popleft())
            if written:
                self.outbox[0] = self.outbox[0][written:]
                break
        if self.outbox and not self.waiting_to_write:
            self.loop.add_writer(self.sock, self.flush)
        elif not self.outbox and self.waiting_to_write:
            self.loop.remove_writer(self.sock)
        self.waiting_to_write = bool(self.outbox)

    def close(self) -> None:
        self.dead = True
        if self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock)
                self.loop.remove_writer(self.sock)
        self.sock.close()


def _read_answer(body: memoryview) -> Any:
    """An answer's message; one that does not unpickle here (an exception class whose constructor
    takes other arguments than it keeps, say) fails its job, not the worker's stream."""
    try:
        return decode(body)[0]
    except Exception as exc:
        return (False, RuntimeError(f"a worker's answer could not be read: {type(exc).__name__}: {exc}"))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _outcome(job: _Job, answer: tuple[bool, Any]) -> None:
    ok, value = answer
    if job.future.done():
        if ok and job.future.cancelled() and job.abandoned is not None:
            try:
                job.abandoned(value)
            except Exception:
                logger.exception("cleaning up after an abandoned image job failed")
    elif ok:
        job.future.set_result(value)
    else:
        job.future.set_exception(value)


async def _run_alone(message: list[bytes]) -> Any:
    """One job in a process of its own; _Gone when it dies there too."""
    loop = asyncio.get_running_loop()
    worker = await asyncio.to_thread(_Worker.spawn)
    answered = _Job(message, loop.create_future())

    def readable() -> None:
        try:
            answers = worker.take_messages()
        except _Gone as exc:
            if not answered.future.done():
                answered.future.set_exception(exc)
            return
        if answers:
            _outcome(answered, answers[0])

    worker.loop = loop
    loop.add_reader(worker.sock, readable)
    try:
        worker.send(message)
        return await answered.future
    finally:
        worker.close()


class ImageWorkers:
    """`size` worker processes, fed by whichever event loop calls `run`."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._workers = [_Worker.spawn() for _ in range(size)]
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    def start(self) -> None:
        """Block until every idle worker has imported Pillow: for start-up, never on an event loop."""
        with self._lock:
            idle = [w for w in self._workers if not w.ready and w.loop is None and not w.dead]
            for worker in idle:
                worker.starting = True
        deadline = time.monotonic() + START_TIMEOUT
        try:
            for worker in idle:
                try:
                    worker.wait_ready(deadline)
                except _Gone:
                    self._replace(worker)
        finally:
            with self._lock:
                for worker in idle:
                    worker.starting = False
            self._wake(None)

    async def run(
        self, job: Callable[..., T], *args: object, abandoned: Callable[[T], object] | None = None
    ) -> T:
        """`job(*args)` in a worker; WorkerCrashedError when it kills even a process of its own.

        `abandoned` is called with the value of a job whose caller was cancelled while the worker
        ran it (to remove what the job left behind, a temporary file say)."""
        message = encode_job(job, args)
        while True:
            try:
                return await self._call(message, abandoned)
            except _WorkerDied as died:
                if died.running:
                    break
        try:
            return await _run_alone(message)
        except _Gone as exc:
            raise WorkerCrashedError from exc

    async def _call(self, message: list[bytes], abandoned: Callable[[Any], object] | None) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(message, loop.create_future(), abandoned)
        worker, first = await self._acquire(loop, job)
        if first:
            loop.add_reader(worker.sock, self._readable, worker)
        worker.send(message)
        return await job.future

    def _choose(self, loop: asyncio.AbstractEventLoop) -> _Worker | None:
        best = None
        for worker in self._workers:
            if worker.dead or worker.starting or worker.loop not in (None, loop) or len(worker.sent) >= DEPTH:
                continue
            if best is None or len(worker.sent) < len(best.sent):
                best = worker
        return best

    async def _acquire(self, loop: asyncio.AbstractEventLoop, job: _Job) -> tuple[_Worker, bool]:
        """A worker with room for `job`, held for `loop`, and whether this job started the hold;
        waits while every worker is full."""
        while True:
            with self._lock:
                worker = self._choose(loop)
                if worker is not None:
                    first = worker.loop is None
                    worker.loop = loop
                    worker.sent.append(job)
                    return worker, first
                woken: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, woken))
            try:
                await woken
            except asyncio.CancelledError:
                with self._lock:
                    if (loop, woken) in self._waiters:
                        self._waiters.remove((loop, woken))
                if woken.done() and not woken.cancelled():
                    self._wake(loop)
                raise

    def _wake(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Wake one waiter, of `loop` first when a worker of that loop has room (None: any loop)."""
        with self._lock:
            chosen = next((entry for entry in self._waiters if entry[0] is loop), None)
            if chosen is None and self._waiters:
                chosen = self._waiters[0]
            if chosen is None:
                return
            self._waiters.remove(chosen)
        waiter_loop, woken = chosen
        if waiter_loop is _running_loop():
            self._resolve(waiter_loop, woken)
            return
        try:
            waiter_loop.call_soon_threadsafe(self._resolve, waiter_loop, woken)
        except RuntimeError:
            self._wake(loop)

    def _resolve(self, loop: asyncio.AbstractEventLoop, woken: asyncio.Future[None]) -> None:
        if woken.done():
            self._wake(loop)
        else:
            woken.set_result(None)

    def _readable(self, worker: _Worker) -> None:
        """The loop's reader callback: hand each answer to its job, in the order they were sent."""
        loop = worker.loop
        try:
            answers = worker.take_messages()
        except _Gone:
            self._bury(worker)
            return
        for answer in answers:
            with self._lock:
                job = worker.sent.popleft()
                released = not worker.sent
                if released:
                    worker.loop = None
            if released:
                assert loop is not None
                loop.remove_reader(worker.sock)
            _outcome(job, answer)
            self._wake(None if released else loop)

    def _bury(self, worker: _Worker) -> None:
        """Fail a dead worker's jobs so each is tried again, and put a new process in its place."""
        with self._lock:
            jobs = list(worker.sent)
            worker.sent.clear()
        worker.close()
        with self._lock:
            worker.loop = None
        for index, job in enumerate(jobs):
            if not job.future.done():
                job.future.set_exception(_WorkerDied(running=index == 0))
        self._replace(worker)
        for _ in jobs:
            self._wake(None)

    def _replace(self, worker: _Worker) -> None:
        worker.close()
        with self._lock:
            if worker not in self._workers:
                return
        fresh = _Worker.spawn()
        with self._lock:
            self._workers[self._workers.index(worker)] = fresh

    def close(self) -> None:
        """Close every worker's socket; each process ends when it reads the end of its input."""
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.sock.close()
        for worker in workers:
            try:
                worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.process.kill()


_WORKERS: dict[int, ImageWorkers] = {}
_WORKERS_LOCK = threading.Lock()


def image_workers(size: int) -> ImageWorkers:
    """The process's pool of `size` workers, spawned on first use and kept for later batches."""
    with _WORKERS_LOCK:
        workers = _WORKERS.get(size)
        if workers is None:
            workers = _WORKERS[size] = ImageWorkers(size)
        return workers


@atexit.register
def _close_all() -> None:
    with _WORKERS_LOCK:
        pools = list(_WORKERS.values())
        _WORKERS.clear()
    for pool in pools:
        pool.close()
