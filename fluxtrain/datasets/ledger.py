"""Committing finished images into a dataset folder: naming, renaming into place, the manifest.

Every batch working on one folder shares one ledger, whose lock makes choosing a file name,
renaming the finished file into place and recording its manifest entry one step, so concurrent
requests never hand out one name twice or lose each other's manifest entries.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxtrain.datasets.store import list_images, read_manifest, write_manifest
from fluxtrain.names import MAX_NAME_LENGTH, check_name

IMAGE_SUFFIX = ".jpg"
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
    """Where an image came from: a URL, or an uploaded file name; the same source keeps one file."""

    url: str | None = None
    upload: str | None = None

    def matches(self, entry: dict[str, Any]) -> bool:
        if self.url is not None:
            return entry.get("url") == self.url
        return entry.get("url") is None and entry.get("upload") == self.upload

    def fields(self) -> dict[str, Any]:
        return {"url": self.url} if self.url is not None else {"url": None, "upload": self.upload}


@dataclass
class Ledger:
    folder: Path
    manifest: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0

    def _name_for(self, source: Source, stem: str) -> str:
        for name, entry in self.manifest.items():
            if isinstance(entry, dict) and source.matches(entry):
                return name
        candidate = f"{stem}{IMAGE_SUFFIX}"
        counter = 1
        while candidate in self.manifest or (self.folder / candidate).exists():
            counter += 1
            candidate = f"{stem}-{counter}{IMAGE_SUFFIX}"
        return check_name(candidate, what="image file name")

    def commit(self, *, source: Source, stem: str, jpeg: bytes, entry: dict[str, Any]) -> Path:
        """Write `jpeg` under a temporary name, then pick its final name and rename it there."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".incoming-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(jpeg)
            with self.lock:
                name = self._name_for(source, stem)
                target = self.folder / name
                os.replace(tmp, target)
                self.manifest[name] = {**source.fields(), **entry}
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def flush(self) -> None:
        """Write the manifest, merged with entries other processes wrote, for files that exist."""
        with self.lock:
            if not self.folder.is_dir():
                return
            present = {p.name for p in list_images(self.folder)}
            merged = {**read_manifest(self.folder), **self.manifest}
            self.manifest = {name: entry for name, entry in merged.items() if name in present}
            write_manifest(self.folder, self.manifest)


_LEDGERS: dict[Path, Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


def acquire(folder: Path) -> Ledger:
    """The shared ledger of `folder`, loading its manifest when no batch holds it yet."""
    with _LEDGERS_LOCK:
        ledger = _LEDGERS.get(folder)
        if ledger is None:
            ledger = Ledger(folder=folder, manifest=read_manifest(folder))
            _LEDGERS[folder] = ledger
        ledger.users += 1
        return ledger


def release(ledger: Ledger) -> None:
    """Flush the manifest and let the ledger go once no batch holds it."""
    try:
        with contextlib.suppress(FileNotFoundError):
            ledger.flush()
    finally:
        with _LEDGERS_LOCK:
            ledger.users -= 1
            if ledger.users == 0 and _LEDGERS.get(ledger.folder) is ledger:
                del _LEDGERS[ledger.folder]
