"""Image work on every core: decoding, colour conversion, JPEG encoding and hashing in worker processes.

Threads could not do this: the Python parts of Pillow's pipeline hold the GIL, so a batch used
about one core and the event loop fought the image threads for it. A body is pickled once into
a worker, which writes the JPEG into the dataset folder under a temporary name and hands back only
that name, so no image crosses a pipe twice; the event loop only moves bytes.

The pool (FLUXTRAIN_IMAGE_WORKERS processes, default the CPU count) is forked from a fork server
that imported Pillow once, never from the service process with its threads. They run at the
service's own priority: a lower one cost a third of the throughput on a shared machine, and the
light event loop answers `/health` within 100 ms beside busy workers all the same. A worker that dies on
a hostile image breaks the whole pool, failing every job in it; the pool is replaced and each of
those jobs runs again alone in a process of its own, so only the image that kills its process
fails, with WorkerCrashedError.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fluxtrain.datasets.images import NormalizedImage, Stored, normalize_image
from fluxtrain.datasets.ledger import DatasetDeletedError, write_incoming

T = TypeVar("T")

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


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


@dataclass(frozen=True)
class Written:
    """What a worker hands back: the temporary file holding the JPEG, never the JPEG's bytes."""

    incoming: Path
    width: int
    height: int
    stored: Stored
    sha256: str
    size: int


def _pool(size: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=size, mp_context=_CONTEXT)


def prepare(data: bytes, max_pixels: int) -> Prepared:
    """Normalise and hash one downloaded body; runs in a worker process."""
    return Prepared(
        image=normalize_image(data, max_pixels=max_pixels),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def prepare_into(folder: Path, data: bytes, max_pixels: int) -> Written:
    """Normalise and hash one downloaded body and write its JPEG into `folder`; runs in a worker.

    A vanished folder is answered with FileNotFoundError (the caller's DatasetDeletedError), which
    crosses the process boundary intact.
    """
    prepared = prepare(data, max_pixels)
    try:
        incoming = write_incoming(folder, prepared.image.jpeg)
    except DatasetDeletedError as exc:
        raise FileNotFoundError(str(folder)) from exc
    image = prepared.image
    return Written(incoming, image.width, image.height, image.stored, prepared.sha256, prepared.size)


class ImageWorkers:
    """A process pool that replaces itself when a worker dies."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._pool = _pool(size)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = _pool(self._size)
        broken.shutdown(wait=False, cancel_futures=True)

    def start(self) -> None:
        """Start every worker now, blocking: the first start runs the fork server, which imports
        Pillow for a second or more, and that must not happen on the event loop."""
        for _ in range(2):
            pool = self._pool
            try:
                for future in [pool.submit(int) for _ in range(self._size)]:
                    future.result()
                return
            except BrokenProcessPool:
                self._replace(pool)

    async def run(self, job: Callable[..., T], *args: object) -> T:
        """`job(*args)` in a worker; WorkerCrashedError when it kills even a process of its own."""
        pool = self._pool
        try:
            return await asyncio.wrap_future(pool.submit(job, *args))
        except BrokenProcessPool:
            self._replace(pool)
        alone = _pool(1)
        try:
            return await asyncio.wrap_future(alone.submit(job, *args))
        except BrokenProcessPool as exc:
            raise WorkerCrashedError from exc
        finally:
            alone.shutdown(wait=False)


_WORKERS: dict[int, ImageWorkers] = {}
_WORKERS_LOCK = threading.Lock()


def image_workers(size: int) -> ImageWorkers:
    """The process's pool of `size` workers, started on first use and kept for later batches."""
    with _WORKERS_LOCK:
        workers = _WORKERS.get(size)
        if workers is None:
            workers = _WORKERS[size] = ImageWorkers(size)
        return workers
