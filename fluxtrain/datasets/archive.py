"""Reading images out of an uploaded zip without trusting its names or its declared sizes.

Entry names are only ever used as labels and as the source of a sanitised file stem, never as a
path; sizes are bounded per entry and in total, and reads stop at the bound whatever the header
claims.
"""

from __future__ import annotations

import posixpath
import zipfile
from collections.abc import Iterator
from typing import BinaryIO

MAX_ENTRIES = 10_000
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class ArchiveEntryError(Exception):
    """One archive entry (or the archive) cannot be used; the message is the reason shown."""


def is_zip(handle: BinaryIO) -> bool:
    """Whether an uploaded file is a zip, judged by its first bytes, the position left at the start."""
    head = handle.read(4)
    handle.seek(0)
    return head in _ZIP_MAGIC


def _unsafe_name(name: str) -> bool:
    normalised = name.replace("\\", "/")
    parts = normalised.split("/")
    return normalised.startswith("/") or ".." in parts or (len(parts[0]) == 2 and parts[0][1] == ":")


def _skipped(info: zipfile.ZipInfo) -> bool:
    name = info.filename.replace("\\", "/")
    base = posixpath.basename(name)
    return info.is_dir() or name.startswith("__MACOSX/") or not base or base.startswith(".")


def iter_images(
    handle: BinaryIO, *, archive_name: str, max_entry_bytes: int, max_total_bytes: int
) -> Iterator[tuple[str, bytes | ArchiveEntryError]]:
    """Yield (label, bytes) for each usable entry and (label, error) for each refused one."""
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        yield archive_name, ArchiveEntryError(f"not a readable zip archive: {exc}")
        return
    with archive:
        infos = [info for info in archive.infolist() if not _skipped(info)]
        if not infos:
            yield (
                archive_name,
                ArchiveEntryError(
                    "the archive holds no files (folders, hidden files and __MACOSX/ are skipped)"
                ),
            )
            return
        if len(infos) > MAX_ENTRIES:
            reason = f"too many entries: {len(infos)}, the limit is {MAX_ENTRIES}"
            yield archive_name, ArchiveEntryError(reason)
            return
        total = 0
        for info in infos:
            label = f"{archive_name}/{info.filename}"
            if _unsafe_name(info.filename):
                yield label, ArchiveEntryError("refused: unsafe path in archive")
                continue
            if info.file_size > max_entry_bytes:
                yield (
                    label,
                    ArchiveEntryError(
                        f"too large: {info.file_size} bytes uncompressed, the limit is {max_entry_bytes}"
                    ),
                )
                continue
            if total + info.file_size > max_total_bytes:
                yield (
                    label,
                    ArchiveEntryError(f"too large: the archive unpacks to more than {max_total_bytes} bytes"),
                )
                continue
            try:
                with archive.open(info) as entry:
                    data = entry.read(max_entry_bytes + 1)
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
                yield label, ArchiveEntryError(f"corrupt archive entry: {exc}")
                continue
            if len(data) > max_entry_bytes:
                yield label, ArchiveEntryError(f"too large: over the limit of {max_entry_bytes} bytes")
                continue
            total += len(data)
            yield label, data
