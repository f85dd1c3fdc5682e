"""The ledger's index and the manifest file: a big batch costs no manifest scan per image."""

import os
import stat
import time
from pathlib import Path

import pytest

from fluxtrain import fsutil
from fluxtrain.datasets import ledger
from fluxtrain.datasets.store import read_manifest, write_manifest


def _incoming(book: ledger.Ledger, index: int) -> ledger.Incoming:
    return ledger.Incoming(
        source=ledger.Source(url=f"https://example.test/{index}.jpg"),
        stem=f"img{index}",
        incoming=ledger.write_incoming(book.folder, b"jpeg %d" % index),
        entry={"sha256": f"{index:064x}", "bytes": 6, "width": 1, "height": 1, "stored": "kept"},
    )


def test_committing_a_thousand_new_urls_matches_no_entry_of_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "datasets" / "big"
    book = ledger.acquire(folder)
    matched = 0
    matches = ledger.Source.matches

    def counting(self: ledger.Source, entry: dict[str, object]) -> bool:
        nonlocal matched
        matched += 1
        return matches(self, entry)

    monkeypatch.setattr(ledger.Source, "matches", counting)
    try:
        for start in range(0, 1000, 50):
            outcomes = book.commit_files([_incoming(book, index) for index in range(start, start + 50)])
            assert all(isinstance(outcome, Path) for outcome in outcomes)
        again = book.commit_files([_incoming(book, 7)])
    finally:
        ledger.release(book)
    assert matched <= 1
    assert again == [folder / "img7.jpg"]
    assert len(read_manifest(folder)) == 1000
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def test_one_failing_item_of_a_batch_fails_alone(tmp_path: Path) -> None:
    folder = tmp_path / "datasets" / "set"
    book = ledger.acquire(folder)
    try:
        good, bad = _incoming(book, 1), _incoming(book, 2)
        bad.incoming.unlink()
        outcomes = book.commit_files([bad, good])
    finally:
        ledger.release(book)
    assert isinstance(outcomes[0], FileNotFoundError)
    assert outcomes[1] == folder / "img1.jpg"
    assert list(read_manifest(folder)) == ["img1.jpg"]


def test_the_manifest_has_one_image_per_line_and_reads_back(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    manifest = {
        f"{name}.jpg": {"url": f"https://example.test/{name}", "width": 2} for name in ("b", "a", "c")
    }
    for name in manifest:
        (folder / name).write_bytes(b"x")
    write_manifest(folder, manifest)
    lines = (folder / "manifest.json").read_text().splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and len(lines) == 5
    assert lines[1].startswith('  "a.jpg": {')
    assert read_manifest(folder) == manifest
    write_manifest(folder, {})
    assert read_manifest(folder) == {}


def test_an_incoming_file_is_new_whole_and_readable_whatever_the_umask(tmp_path: Path) -> None:
    """Names are the process's and a counter's: one an earlier process left behind is passed over,
    never written into; the mode is the dataset's (0644) under a strict umask too."""
    left_over = tmp_path / f".incoming-{os.getpid()}-{next(ledger._INCOMING_NUMBERS) + 1}.tmp"
    left_over.write_bytes(b"an earlier process's")
    previous = os.umask(0o077)
    try:
        first = ledger.write_incoming(tmp_path, b"first" * 20_000)
        second = ledger.write_incoming(tmp_path, b"second")
    finally:
        os.umask(previous)
    assert len({first, second, left_over}) == 3
    assert left_over.read_bytes() == b"an earlier process's"
    assert first.read_bytes() == b"first" * 20_000 and second.read_bytes() == b"second"
    assert stat.S_IMODE(first.stat().st_mode) == ledger.IMAGE_MODE == 0o644


def test_writing_into_a_deleted_folder_is_a_deleted_dataset(tmp_path: Path) -> None:
    with pytest.raises(ledger.DatasetDeletedError):
        ledger.write_incoming(tmp_path / "gone", b"jpeg")


def _aged(path: Path, data: bytes, *, seconds: float) -> Path:
    path.write_bytes(data)
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)
    return path


def test_opening_a_ledger_removes_what_killed_writers_left_and_nothing_else(tmp_path: Path) -> None:
    """Writes in progress older than an hour were abandoned (a live writer renames its file within
    seconds); fresh ones, visible files, folders and links stay, and a link is never followed."""
    folder = tmp_path / "datasets" / "set"
    folder.mkdir(parents=True)
    hour = fsutil.STALE_TEMPORARY_SECONDS
    stale_image = _aged(folder / ".incoming-4242-7.tmp", b"half a jpeg", seconds=hour + 60)
    stale_manifest = _aged(folder / ".manifest.json.k2j4x.tmp", b"{", seconds=hour + 60)
    fresh = _aged(folder / ".incoming-4242-8.tmp", b"being written", seconds=hour - 60)
    visible = _aged(folder / "notes.tmp", b"the user's", seconds=hour * 5)
    (folder / ".cache.tmp").mkdir()
    outside = _aged(tmp_path / "outside.txt", b"not ours", seconds=hour * 5)
    link = folder / ".link.tmp"
    link.symlink_to(outside)
    os.utime(link, (0, 0), follow_symlinks=False)

    book = ledger.acquire(folder)
    try:
        assert not stale_image.exists() and not stale_manifest.exists()
        assert fresh.read_bytes() == b"being written" and visible.read_bytes() == b"the user's"
        assert (folder / ".cache.tmp").is_dir() and link.is_symlink() and outside.read_bytes() == b"not ours"
        again = _aged(folder / ".incoming-4242-9.tmp", b"left while the batch runs", seconds=hour * 2)
        assert ledger.acquire(folder) is book
        ledger.release(book)
        assert again.exists(), "only a process's first open of the ledger looks"
    finally:
        ledger.release(book)


def test_a_folder_that_is_not_there_has_nothing_stale() -> None:
    assert fsutil.remove_stale_temporaries(Path("/nonexistent/fluxtrain")) == 0
