"""Bringing images into a dataset: from URLs (concurrent, safe fetching) or from uploaded files.

Fetching runs on the event loop; a downloaded body's decoding, encoding and hashing run in worker
processes (`image_workers`, FLUXTRAIN_IMAGE_WORKERS), which also write its JPEG under a temporary
name; naming those files and recording their manifest entries run in a shared thread pool, a
batch at a time (`commits`), so the service keeps answering while a large batch is processed.
Uploads are normalised in that thread pool. A URL first waits for a slot on its host
(FLUXTRAIN_DOWNLOAD_PER_HOST, released once its body is read), then for one of the batch's
FLUXTRAIN_DOWNLOAD_CONCURRENCY slots, held while it is fetched; its timeout starts after both.
A fetched body waits for an image worker without holding a connection slot, so a burst of
answers queued at the workers does not idle the network; the bodies held at once (fetching or
waiting) are bounded all the same: a batch runs BODIES_PER_FETCH_SLOT tasks per connection slot,
each taking the next URL once its last one is done, so a list of 10,000 URLs is not 10,000 tasks
waiting on a semaphore for a body slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from fluxtrain.datasets import archive, ledger, progress
from fluxtrain.datasets.commits import Committer
from fluxtrain.datasets.fetch import FetchClient, FetchError, HostSlots, check_url, fetch_bytes, make_client
from fluxtrain.datasets.image_workers import (
    Prepared,
    WorkerCrashedError,
    Written,
    image_workers,
    prepare,
    prepare_into,
)
from fluxtrain.datasets.images import ImageRejectedError
from fluxtrain.datasets.pairs import Role
from fluxtrain.datasets.store import control_dir, dataset_dir
from fluxtrain.errors import InvalidInputError
from fluxtrain.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

BODIES_PER_FETCH_SLOT = 2

ResultCallback = Callable[[str, str | None, str | None], None]


@dataclass
class DownloadResult:
    """Per source: the absolute path of its saved image, or the reason it was not saved."""

    files: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def run_download(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a download from synchronous code (the CLI, the bench) on uvloop where it is installed:
    the loop uvicorn picks for the service too, with about an eighth less event-loop CPU per image."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


@lru_cache(maxsize=1)
def image_executor() -> ThreadPoolExecutor:
    """One pool for all image work in the process, as wide as the CPUs it may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=max(2, cpus), thread_name_prefix="fluxtrain-image")


def commit_prepared(book: ledger.Ledger, *, source: ledger.Source, stem: str, prepared: Prepared) -> Path:
    """Write a normalised image and its manifest entry into the dataset; blocking, for the thread pool."""
    return book.commit(source=source, stem=stem, jpeg=prepared.image.jpeg, entry=prepared.manifest_entry())


def store_image(
    book: ledger.Ledger, *, source: ledger.Source, stem: str, data: bytes, max_pixels: int
) -> Path:
    """Normalise one image in this thread and commit it; blocking, for the thread pool."""
    saved = book.saved_upload(source)
    if saved is not None:
        return saved
    return commit_prepared(book, source=source, stem=stem, prepared=prepare(data, max_pixels))


def _reason_for(exc: Exception) -> str:
    if isinstance(
        exc,
        FetchError
        | ImageRejectedError
        | WorkerCrashedError
        | archive.ArchiveEntryError
        | ledger.DatasetDeletedError,
    ):
        return str(exc)
    if isinstance(exc, OSError):
        return f"could not save the image: {exc.strerror or exc}"
    logger.error("unexpected error while ingesting an image", exc_info=exc)
    return f"unexpected error: {type(exc).__name__}"


def _in_order(keys: Iterable[str], result: DownloadResult) -> DownloadResult:
    ordered = DownloadResult()
    for key in keys:
        if key in result.files:
            ordered.files[key] = result.files[key]
        elif key in result.failed:
            ordered.failed[key] = result.failed[key]
    return ordered


def _discard_incoming(written: Written) -> None:
    """The temporary file of a worker's answer nobody waits for any more (its download was cancelled)."""
    with contextlib.suppress(OSError):
        Path(written.incoming).unlink()


async def _wind_down(tasks: list[asyncio.Future[None]], committer: Committer) -> None:
    """Stop a download's tasks (all done, one failed, or the download was cancelled) and let its
    committer finish what was handed to it, so nothing reports or commits after this returns."""
    for task in tasks:
        task.cancel()
    done = asyncio.ensure_future(_stopped(tasks, committer))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await done
        raise


async def _stopped(tasks: list[asyncio.Future[None]], committer: Committer) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    await committer.close()


def _settle(book: ledger.Ledger, result: DownloadResult) -> None:
    """Release the ledger; when the dataset was deleted meanwhile, its saved files are gone too."""
    ledger.release(book)
    if not book.alive():
        reason = str(ledger.DatasetDeletedError())
        result.failed.update(dict.fromkeys(result.files, reason))
        result.files.clear()


def _role_folder(settings: Settings, name: str, role: Role) -> Path:
    """The folder images of `role` go into: the dataset's own, or its `control/`."""
    folder = dataset_dir(settings, name, must_exist=False)
    return control_dir(folder) if role == "control" else folder


def control_stems(urls: list[str], control_for: list[str] | None, role: Role) -> dict[str, str]:
    """Each distinct URL's control stem (`cat`, `cat_0`: whose reference it is); none for targets."""
    if role == "target":
        if control_for is not None:
            raise InvalidInputError("control_for is only for role 'control'")
        return {}
    if control_for is None or len(control_for) != len(urls):
        raise InvalidInputError(
            "role 'control' needs control_for: one control stem per URL (e.g. 'cat' or 'cat_0' for "
            "the target cat.jpg)"
        )
    stems: dict[str, str] = {}
    for url, given in zip(urls, control_for, strict=True):
        stem = ledger.stem_for(given)
        if stem != given.rpartition(".")[0] and stem != given:
            raise InvalidInputError(f"control_for '{given}' is not a safe stem (letters, digits, '-', '_')")
        if stems.setdefault(url, stem) != stem:
            raise InvalidInputError(f"URL {url} is given twice with different control stems")
    return stems


async def download_images(
    *,
    settings: Settings,
    name: str,
    urls: list[str],
    on_result: ResultCallback | None = None,
    role: Role = "target",
    control_for: list[str] | None = None,
) -> DownloadResult:
    """Fetch every distinct URL into dataset `name`; per-URL trouble lands in `failed`, never raises.

    With role 'control' the images go into the dataset's `control/`, each under the stem
    `control_for` gives it, so it pairs with its target (`datasets.pairs`)."""
    if not urls:
        raise InvalidInputError("urls must not be empty")
    if len(urls) > settings.max_urls:
        raise InvalidInputError(
            f"at most {settings.max_urls} URLs per request (FLUXTRAIN_MAX_URLS), got {len(urls)}"
        )
    stems = control_stems(urls, control_for, role)
    folder = _role_folder(settings, name, role)
    into = str(folder)
    unique = list(dict.fromkeys(urls))
    result = DownloadResult()
    loop = asyncio.get_running_loop()
    executor = image_executor()
    workers = image_workers(settings.image_workers)
    fetch_slots = asyncio.Semaphore(settings.download_concurrency)
    allow = settings.allow_networks
    host_slots = HostSlots(settings.download_per_host)
    pending = iter(unique)
    runners = min(len(unique), BODIES_PER_FETCH_SLOT * settings.download_concurrency)

    async def incoming(client: FetchClient, url: str) -> ledger.Incoming:
        """The URL's body fetched and turned into a temporary JPEG file by a worker."""
        checked = check_url(url, allow)
        async with host_slots.hold(checked.host), fetch_slots:
            fetched = await fetch_bytes(
                client,
                url,
                checked=checked,
                allow=allow,
                max_bytes=settings.max_download_bytes,
                timeout=settings.download_timeout,
            )
        try:
            written = await workers.run(
                prepare_into, into, fetched.content, settings.max_image_pixels, abandoned=_discard_incoming
            )
        except FileNotFoundError as exc:
            raise ledger.DatasetDeletedError from exc
        finally:
            del fetched
        return ledger.Incoming(
            source=ledger.Source(url=url),
            stem=stems.get(url) or ledger.stem_for_url(url),
            incoming=Path(written.incoming),
            entry=written.manifest_entry(),
        )

    def finished(url: str, path: str | None, reason: str | None) -> None:
        if path is not None:
            result.files[url] = path
        else:
            result.failed[url] = reason or "failed"
        tracker.record(saved=path is not None)
        if on_result is not None:
            on_result(url, path, reason)

    def committed(url: str, outcome: Path | Exception) -> None:
        if isinstance(outcome, Exception):
            finished(url, None, _reason_for(outcome))
        else:
            finished(url, str(outcome), None)

    async def runner(client: FetchClient) -> None:
        """Take the next URL until none is left; its commit finishes without this task."""
        for url in pending:
            try:
                item = await incoming(client, url)
            except Exception as exc:
                committer.skip()
                finished(url, None, _reason_for(exc))
            else:
                committer.commit(item, partial(committed, url))

    client = make_client(
        allow=allow,
        concurrency=settings.download_concurrency,
        ca_bundle=settings.ca_bundle,
        host_slots=host_slots,
    )
    tracker = progress.start(name, len(unique))
    try:
        async with client:
            book = await loop.run_in_executor(executor, ledger.acquire, folder)
            committer = Committer(book, executor, expected=len(unique))
            tasks = [asyncio.ensure_future(runner(client)) for _ in range(runners)]
            try:
                await asyncio.gather(*tasks)
                await committer.settled()
            finally:
                await _wind_down(tasks, committer)
                await loop.run_in_executor(executor, _settle, book, result)
    finally:
        progress.finish(tracker)
    return _in_order(unique, result)


def _ingest_upload(
    book: ledger.Ledger, settings: Settings, filename: str, handle: BinaryIO, result: DownloadResult
) -> None:
    """One uploaded file, which may be a zip of images; blocking, for the worker pool."""
    if archive.is_zip(handle):
        for label, data_or_error in archive.iter_images(
            handle,
            archive_name=filename,
            max_entry_bytes=settings.max_download_bytes,
            max_total_bytes=settings.max_upload_bytes,
        ):
            _store_one(book, settings, label, data_or_error, result)
        return
    data = handle.read(settings.max_download_bytes + 1)
    if len(data) > settings.max_download_bytes:
        _store_one(
            book,
            settings,
            filename,
            archive.ArchiveEntryError(f"too large: over the limit of {settings.max_download_bytes} bytes"),
            result,
        )
        return
    _store_one(book, settings, filename, data, result)


def _unique_key(label: str, result: DownloadResult) -> str:
    """`label`, or `label#2`, `label#3`, ... when this request already reported that label."""
    key = label
    counter = 1
    while key in result.files or key in result.failed:
        counter += 1
        key = f"{label}#{counter}"
    return key


def _store_one(
    book: ledger.Ledger,
    settings: Settings,
    label: str,
    data_or_error: bytes | Exception,
    result: DownloadResult,
) -> None:
    key = _unique_key(label, result)
    try:
        if isinstance(data_or_error, Exception):
            raise data_or_error
        path = store_image(
            book,
            source=ledger.Source(upload=label, sha256=hashlib.sha256(data_or_error).hexdigest()),
            stem=ledger.stem_for(label),
            data=data_or_error,
            max_pixels=settings.max_image_pixels,
        )
    except Exception as exc:
        result.failed[key] = _reason_for(exc)
        return
    result.files[key] = str(path)


async def add_uploads(
    *, settings: Settings, name: str, uploads: Sequence[tuple[str, BinaryIO]], role: Role = "target"
) -> DownloadResult:
    """Normalise uploaded images (or zips of them) into dataset `name`, keyed by their file names.

    With role 'control' they go into its `control/`; a file's own stem (`cat.png`, `cat_0.png`)
    says which target it is a reference of.

    Keys are the uploaded file name, or `archive.zip/entry` for a zip's entries; when one request
    holds the same key more than once, its later parts are keyed `name#2`, `name#3`, ... so every
    part is reported exactly once, in `files` or in `failed`.
    """
    if not uploads:
        raise InvalidInputError("no files were uploaded")
    folder = _role_folder(settings, name, role)
    loop = asyncio.get_running_loop()
    executor = image_executor()
    result = DownloadResult()
    book = await loop.run_in_executor(executor, ledger.acquire, folder)
    try:
        for filename, handle in uploads:
            label = filename or "upload"
            await loop.run_in_executor(executor, _ingest_upload, book, settings, label, handle, result)
    finally:
        await loop.run_in_executor(executor, _settle, book, result)
    return result
