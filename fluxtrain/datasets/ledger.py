"""Committing finished images into a dataset folder: naming, renaming into place, the manifest.

Choosing a file name, renaming the finished file into place and recording its manifest entry is
one step under the dataset's lock (`locks.dataset_lock`, shared by threads and processes), so
concurrent batches, in the service or in a CLI beside it, never hand out one name twice or lose
each other's manifest entries. The manifest follows the files: it is rewritten atomically during
a batch at most every FLUSH_SECONDS, merged with what other writers recorded, so a crash leaves
at most that much of the batch unrecorded; fetching such an image again finds its unrecorded file
by name and content and records it, rather than saving a duplicate beside it. A batch keeps the
identity of the folder it started in; once that folder is deleted, its remaining images fail
instead of recreating part of it. Temporary files a killed process left in the folder are
removed when a process first opens its ledger (`fsutil.remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrain.datasets.locks import dataset_lock
from fluxtrain.datasets.store import MANIFEST_NAME, image_names, read_manifest, write_manifest
from fluxtrain.fsutil import TEMPORARY_SUFFIX, remove_stale_temporaries
from fluxtrain.names import MAX_NAME_LENGTH, check_name

FLUSH_SECONDS = 1.0
IMAGE_SUFFIX = ".jpg"
IMAGE_MODE = 0o644
_INCOMING_NUMBERS = itertools.count()
_STEM_LIMIT = MAX_NAME_LENGTH - 20
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def stem_for(source_name: str) -> str:
    """A safe file stem from a URL path segment or an uploaded file name; 'image' when nothing is left."""
    segment = urllib.parse.unquote(source_name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
    stem, dot, _suffix = segment.rpartition(".")
    if not dot:
        stem = segment
    cleaned = _UNSAFE.sub("_", stem).strip("._-")[:_STEM_LIMIT].rstrip("._-")
    return cleaned or "image"


def stem_for_url(url: str) -> str:
    """The stem of a URL's last path segment, its query and fragment dropped."""
    return stem_for(urllib.parse.urlsplit(url).path)


@dataclass(frozen=True)
class Source:
    """Where an image came from; a URL keeps one file per URL, an upload one file per content.

    An upload is identified by the sha256 of its bytes, not its file name: the same bytes uploaded
    again (under any name) keep their one file, and different bytes never replace another image.
    """

    url: str | None = None
    upload: str | None = None
    sha256: str | None = None

    def key(self) -> tuple[str, str] | None:
        """What `Ledger`'s index finds this source's entry by; None when only a scan can."""
        if self.url is not None:
            return ("url", self.url)
        return ("upload", self.sha256) if self.sha256 is not None else None

    def matches(self, entry: dict[str, Any]) -> bool:
        if self.url is not None:
            return entry.get("url") == self.url
        return (
            entry.get("url") is None
            and "upload" in entry
            and self.sha256 is not None
            and entry.get("sha256") == self.sha256
        )

    def fields(self) -> dict[str, Any]:
        return {"url": self.url} if self.url is not None else {"url": None, "upload": self.upload}


class DatasetDeletedError(Exception):
    """The dataset folder a batch was writing into was deleted (or replaced) while it ran."""

    def __init__(self) -> None:
        super().__init__("the dataset was deleted during the download")


def _entry_key(entry: Any) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("url") is not None:
        return ("url", str(entry["url"]))
    sha256 = entry.get("sha256")
    return ("upload", str(sha256)) if "upload" in entry and sha256 is not None else None


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(folder)
    except FileNotFoundError:
        return None
    return (stat.st_dev, stat.st_ino)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def write_incoming(folder: Path, jpeg: bytes) -> Path:
    """`jpeg` in a hidden temporary file of `folder`, for `Ledger.commit_file` to name.

    Named by process and counter and created exclusively (a name an earlier process left is passed
    over): 25 us for a 50 KB image against 36 us through `tempfile.mkstemp`'s random names and
    file object, once per downloaded image.
    """
    while True:
        path = folder / f".incoming-{os.getpid()}-{next(_INCOMING_NUMBERS)}{TEMPORARY_SUFFIX}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, IMAGE_MODE)
        except FileExistsError:
            continue
        except FileNotFoundError as exc:
            raise DatasetDeletedError from exc
        break
    try:
        try:
            os.fchmod(fd, IMAGE_MODE)
            view = memoryview(jpeg)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Incoming:
    """A finished temporary file (`write_incoming`) waiting for its name and manifest entry."""

    source: Source
    stem: str
    incoming: Path
    entry: dict[str, Any]


@dataclass
class Ledger:
    """What one process knows of a dataset folder; touched only under the dataset's lock."""

    folder: Path
    identity: tuple[int, int] | None
    manifest: dict[str, Any]
    disk_stamp: tuple[int, int, int] | None
    unflushed: bool = False
    last_flush: float = float("-inf")
    users: int = 0
    _index: dict[tuple[str, str], list[str]] | None = None

    def _set_manifest(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self._index = None

    def _names_under(self, key: tuple[str, str]) -> list[str]:
        """The manifest entries' names under `key`, in manifest order, indexed so that a
        10,000-image batch never scans the manifest per image."""
        if self._index is None:
            self._index = {}
            for name, entry in self.manifest.items():
                entry_key = _entry_key(entry)
                if entry_key is not None:
                    self._index.setdefault(entry_key, []).append(name)
        return self._index.get(key, [])

    def alive(self) -> bool:
        """Whether the folder this ledger was opened on is still the dataset's folder."""
        return self.identity is not None and _identity(self.folder) == self.identity

    def _check_alive(self) -> None:
        if not self.alive():
            raise DatasetDeletedError

    def _refresh(self) -> None:
        """Take in entries other processes recorded since this ledger last read or wrote the manifest."""
        stamp = _stamp(self.folder / MANIFEST_NAME)
        if stamp != self.disk_stamp:
            self._set_manifest({**read_manifest(self.folder), **self.manifest})
            self.disk_stamp = stamp

    def _write(self) -> None:
        present = image_names(self.folder)
        self._set_manifest({name: entry for name, entry in self.manifest.items() if name in present})
        write_manifest(self.folder, self.manifest)
        self.disk_stamp = _stamp(self.folder / MANIFEST_NAME)
        self.unflushed = False
        self.last_flush = time.monotonic()

    def _existing(self, source: Source) -> str | None:
        key = source.key()
        names = self._names_under(key) if key is not None else list(self.manifest)
        for name in names:
            if source.matches(self.manifest[name]) and (self.folder / name).is_file():
                return name
        return None

    def _name_for(self, stem: str, incoming: Path) -> str:
        """The first of `stem`'s names (`stem.jpg`, `stem-2.jpg`, ...) that is free, unless one
        before it is a file without a manifest entry holding `incoming`'s bytes: then that one.

        One walk and, for a new name, one stat: a name is looked at once, and `incoming`'s size is
        read only when there is an unrecorded file to compare with. A name held by a symbolic link
        that loops counts as taken.
        """
        candidate, counter, size = f"{stem}{IMAGE_SUFFIX}", 1, None
        while True:
            if candidate not in self.manifest:
                path = self.folder / candidate
                try:
                    found = path.stat()
                except FileNotFoundError:
                    return check_name(candidate, what="image file name")
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                    found = None
                if found is not None and stat.S_ISREG(found.st_mode):
                    size = incoming.stat().st_size if size is None else size
                    if found.st_size == size and path.read_bytes() == incoming.read_bytes():
                        return check_name(candidate, what="image file name")
            counter += 1
            candidate = f"{stem}-{counter}{IMAGE_SUFFIX}"

    def saved_upload(self, source: Source) -> Path | None:
        """The file already holding this upload's content, so identical bytes are not decoded again."""
        if source.url is not None:
            return None
        with dataset_lock(self.folder):
            self._check_alive()
            self._refresh()
            name = self._existing(source)
        return None if name is None else self.folder / name

    def commit(self, *, source: Source, stem: str, jpeg: bytes, entry: dict[str, Any]) -> Path:
        """Write `jpeg` under a temporary name, then `commit_file` it."""
        return self.commit_file(
            source=source, stem=stem, incoming=write_incoming(self.folder, jpeg), entry=entry
        )

    def commit_file(self, *, source: Source, stem: str, incoming: Path, entry: dict[str, Any]) -> Path:
        """Pick the final name of a finished temporary file (`write_incoming`) and rename it there.

        A URL seen before replaces its own file; an upload whose content is already saved keeps
        that file untouched and its temporary copy is dropped.
        """
        outcome = self.commit_files([Incoming(source=source, stem=stem, incoming=incoming, entry=entry)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def commit_files(self, items: list[Incoming]) -> list[Path | Exception]:
        """`commit_file` for each item, under one hold of the dataset's lock: a batch commits the
        images that finished together at once. Each item's outcome is its path or its error."""
        try:
            with dataset_lock(self.folder):
                self._check_alive()
                self._refresh()
                outcomes: list[Path | Exception] = []
                for item in items:
                    try:
                        outcomes.append(self._commit_locked(item))
                    except Exception as exc:
                        item.incoming.unlink(missing_ok=True)
                        outcomes.append(exc)
                if self.unflushed and time.monotonic() - self.last_flush >= FLUSH_SECONDS:
                    self._write()
        except BaseException:
            for item in items:
                item.incoming.unlink(missing_ok=True)
            raise
        return outcomes

    def _commit_locked(self, item: Incoming) -> Path:
        source = item.source
        name = self._existing(source)
        if name is not None and source.url is None:
            item.incoming.unlink()
            return self.folder / name
        name = name or self._name_for(item.stem, item.incoming)
        target = self.folder / name
        os.replace(item.incoming, target)
        self.manifest[name] = {**source.fields(), **item.entry}
        key = source.key()
        if self._index is not None and key is not None and name not in self._index.get(key, []):
            self._index.setdefault(key, []).append(name)
        self.unflushed = True
        return target

    def flush(self) -> None:
        """Write what this ledger recorded and has not written yet, unless its folder is gone."""
        with dataset_lock(self.folder):
            if self.unflushed and self.alive():
                self._refresh()
                self._write()


_LEDGERS: dict[Path, Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


def acquire(folder: Path) -> Ledger:
    """The shared ledger of `folder`, creating the folder, and a new ledger when it was replaced."""
    with dataset_lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        identity = _identity(folder)
        with _LEDGERS_LOCK:
            ledger = _LEDGERS.get(folder)
            if ledger is None or ledger.identity != identity:
                remove_stale_temporaries(folder)
                ledger = Ledger(
                    folder=folder,
                    identity=identity,
                    manifest=read_manifest(folder),
                    disk_stamp=_stamp(folder / MANIFEST_NAME),
                )
                _LEDGERS[folder] = ledger
            ledger.users += 1
            return ledger


def release(ledger: Ledger) -> None:
    """Flush the manifest and let the ledger go once no batch holds it."""
    try:
        ledger.flush()
    finally:
        with _LEDGERS_LOCK:
            ledger.users -= 1
            if ledger.users == 0 and _LEDGERS.get(ledger.folder) is ledger:
                del _LEDGERS[ledger.folder]
