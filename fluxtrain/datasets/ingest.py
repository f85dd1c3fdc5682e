"""Bringing images into a dataset: from URLs (concurrent, safe fetching) or from uploaded files.

Fetching runs on the event loop; a downloaded body's decoding, encoding and hashing run in worker
processes (`image_workers`, FLUXTRAIN_IMAGE_WORKERS), which also write its JPEG under a temporary
name; naming that file and recording its manifest entry run in a shared thread pool, so the
service keeps answering while a large batch is processed. Uploads are normalised in that thread
pool. A URL first waits for a slot on its host (FLUXTRAIN_DOWNLOAD_PER_HOST, released once its
body is read), then for one of the batch's FLUXTRAIN_DOWNLOAD_CONCURRENCY slots (held until its
image is stored); its timeout starts after both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import BinaryIO

import httpx

from fluxtrain.datasets import archive, ledger, progress
from fluxtrain.datasets.addresses import IPNetwork
from fluxtrain.datasets.fetch import FetchError, HostSlots, check_url, fetch_bytes, make_client
from fluxtrain.datasets.image_workers import (
    Prepared,
    WorkerCrashedError,
    Written,
    image_workers,
    prepare,
    prepare_into,
)
from fluxtrain.datasets.images import ImageRejectedError
from fluxtrain.datasets.store import dataset_dir
from fluxtrain.errors import InvalidInputError
from fluxtrain.settings import Settings

logger = logging.getLogger(__name__)

ResultCallback = Callable[[str, str | None, str | None], None]


@dataclass
class DownloadResult:
    """Per source: the absolute path of its saved image, or the reason it was not saved."""

    files: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def image_executor() -> ThreadPoolExecutor:
    """One pool for all image work in the process, as wide as the CPUs it may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max_workers=max(2, cpus), thread_name_prefix="fluxtrain-image")


def commit_prepared(book: ledger.Ledger, *, source: ledger.Source, stem: str, prepared: Prepared) -> Path:
    """Write a normalised image and its manifest entry into the dataset; blocking, for the thread pool."""
    image = prepared.image
    entry = {
        "sha256": prepared.sha256,
        "bytes": prepared.size,
        "width": image.width,
        "height": image.height,
        "stored": image.stored,
    }
    return book.commit(source=source, stem=stem, jpeg=image.jpeg, entry=entry)


def commit_written(book: ledger.Ledger, *, source: ledger.Source, stem: str, written: Written) -> Path:
    """Name a JPEG a worker wrote and record its manifest entry; blocking, for the thread pool."""
    entry = {
        "sha256": written.sha256,
        "bytes": written.size,
        "width": written.width,
        "height": written.height,
        "stored": written.stored,
    }
    return book.commit_file(source=source, stem=stem, incoming=written.incoming, entry=entry)


def store_image(
    book: ledger.Ledger, *, source: ledger.Source, stem: str, data: bytes, max_pixels: int
) -> Path:
    """Normalise one image in this thread and commit it; blocking, for the thread pool."""
    saved = book.saved_upload(source)
    if saved is not None:
        return saved
    return commit_prepared(book, source=source, stem=stem, prepared=prepare(data, max_pixels))


def _host_of(url: str, allow: Sequence[IPNetwork]) -> str | None:
    """The host whose slot a URL waits for before its timer starts; None when fetching will refuse it."""
    try:
        return check_url(url, allow).host
    except FetchError:
        return None


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
    logger.exception("unexpected error while ingesting an image")
    return f"unexpected error: {type(exc).__name__}"


def _in_order(keys: Iterable[str], result: DownloadResult) -> DownloadResult:
    ordered = DownloadResult()
    for key in keys:
        if key in result.files:
            ordered.files[key] = result.files[key]
        elif key in result.failed:
            ordered.failed[key] = result.failed[key]
    return ordered


def _settle(book: ledger.Ledger, result: DownloadResult) -> None:
    """Release the ledger; when the dataset was deleted meanwhile, its saved files are gone too."""
    ledger.release(book)
    if not book.alive():
        reason = str(ledger.DatasetDeletedError())
        result.failed.update(dict.fromkeys(result.files, reason))
        result.files.clear()


async def download_images(
    *,
    settings: Settings,
    name: str,
    urls: list[str],
    on_result: ResultCallback | None = None,
) -> DownloadResult:
    """Fetch every distinct URL into dataset `name`; per-URL trouble lands in `failed`, never raises."""
    if not urls:
        raise InvalidInputError("urls must not be empty")
    if len(urls) > settings.max_urls:
        raise InvalidInputError(
            f"at most {settings.max_urls} URLs per request (FLUXTRAIN_MAX_URLS), got {len(urls)}"
        )
    folder = dataset_dir(settings, name, must_exist=False)
    unique = list(dict.fromkeys(urls))
    result = DownloadResult()
    loop = asyncio.get_running_loop()
    executor = image_executor()
    workers = image_workers(settings.image_workers)
    semaphore = asyncio.Semaphore(settings.download_concurrency)
    allow = settings.allow_networks
    host_slots = HostSlots(settings.download_per_host)

    async def one(client: httpx.AsyncClient, url: str, book: ledger.Ledger) -> None:
        path: str | None = None
        reason: str | None = None
        host = _host_of(url, allow)
        try:
            async with host_slots.hold(host) if host is not None else contextlib.nullcontext():
                await semaphore.acquire()
                try:
                    fetched = await fetch_bytes(
                        client,
                        url,
                        allow=allow,
                        max_bytes=settings.max_download_bytes,
                        timeout=settings.download_timeout,
                    )
                except BaseException:
                    semaphore.release()
                    raise
            try:
                try:
                    written = await workers.run(
                        prepare_into, folder, fetched.content, settings.max_image_pixels
                    )
                except FileNotFoundError as exc:
                    raise ledger.DatasetDeletedError from exc
                commit = partial(
                    commit_written,
                    book,
                    source=ledger.Source(url=url),
                    stem=ledger.stem_for_url(url),
                    written=written,
                )
                saved = await loop.run_in_executor(executor, commit)
            finally:
                semaphore.release()
            path = str(saved)
        except Exception as exc:
            reason = _reason_for(exc)
        if path is not None:
            result.files[url] = path
        else:
            result.failed[url] = reason or "failed"
        tracker.record(saved=path is not None)
        if on_result is not None:
            on_result(url, path, reason)

    client = make_client(
        allow=allow,
        concurrency=settings.download_concurrency,
        timeout=settings.download_timeout,
        ca_bundle=settings.ca_bundle,
        host_slots=host_slots,
    )
    tracker = progress.start(name, len(unique))
    try:
        async with client:
            book = await loop.run_in_executor(executor, ledger.acquire, folder)
            try:
                await loop.run_in_executor(executor, workers.start)
                await asyncio.gather(*(one(client, url, book) for url in unique))
            finally:
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
    *, settings: Settings, name: str, uploads: Sequence[tuple[str, BinaryIO]]
) -> DownloadResult:
    """Normalise uploaded images (or zips of them) into dataset `name`, keyed by their file names.

    Keys are the uploaded file name, or `archive.zip/entry` for a zip's entries; when one request
    holds the same key more than once, its later parts are keyed `name#2`, `name#3`, ... so every
    part is reported exactly once, in `files` or in `failed`.
    """
    if not uploads:
        raise InvalidInputError("no files were uploaded")
    folder = dataset_dir(settings, name, must_exist=False)
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
