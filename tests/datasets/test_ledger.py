"""The ledger's index and the manifest file: a big batch costs no manifest scan per image."""

from pathlib import Path

import pytest

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
