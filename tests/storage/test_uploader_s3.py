"""Artifact uploads against moto's real S3 API server on loopback, through s3fs."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest

from fluxtrain.rundir import RunDir
from fluxtrain.storage.remote import RemoteStore
from fluxtrain.storage.uploader import (
    ArtifactSync,
    UploadError,
    final_sync,
    load_state,
    remote_url,
    sync_once,
    upload_file,
)

RUN_ID = "20261125-abc123"
PREFIX = f"s3://artifacts/team/loras/{RUN_ID}"


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_upload_file_puts_the_bytes_and_returns_the_url(
    moto_server: object, s3_store: RemoteStore, run_dir: Path
) -> None:
    s3_store.fs.mkdir("artifacts")
    local = run_dir / "output" / "mylora-000001.safetensors"
    url = upload_file(store=s3_store, local_path=local, key=f"{RUN_ID}/output/{local.name}")
    assert url == f"{PREFIX}/output/mylora-000001.safetensors"
    assert s3_store.fs.cat_file(s3_store.path(f"{RUN_ID}/output/{local.name}")) == local.read_bytes()


def test_sync_uploads_checkpoint_and_sample_and_records_them(
    moto_server: object, s3_store: RemoteStore, run_dir: Path
) -> None:
    s3_store.fs.mkdir("artifacts")
    report = sync_once(store=s3_store, run_dir=run_dir)
    assert report.uploaded == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
    assert report.failed == []

    remote = sorted(s3_store.fs.find(f"artifacts/team/loras/{RUN_ID}"))
    assert remote == [
        f"artifacts/team/loras/{RUN_ID}/output/mylora-000001.safetensors",
        f"artifacts/team/loras/{RUN_ID}/samples/000010-0.png",
    ]
    assert s3_store.fs.cat_file(remote[1]) == (run_dir / "samples" / "000010-0.png").read_bytes()

    assert json.loads((run_dir / "uploads.json").read_text()) == {
        "output/mylora-000001.safetensors": f"{PREFIX}/output/mylora-000001.safetensors",
        "samples/000010-0.png": f"{PREFIX}/samples/000010-0.png",
    }
    state = json.loads((run_dir / "uploads-state.json").read_text())
    assert state["version"] == 1 and state["failed"] == {}
    checkpoint = state["uploaded"]["output/mylora-000001.safetensors"]
    assert checkpoint["url"] == f"{PREFIX}/output/mylora-000001.safetensors"
    assert checkpoint["size"] == 1200
    assert checkpoint["mtime_ns"] == (run_dir / "output" / "mylora-000001.safetensors").stat().st_mtime_ns
    assert remote_url(run_dir, "samples/000010-0.png") == f"{PREFIX}/samples/000010-0.png"
    assert remote_url(run_dir, "output/mylora.safetensors") is None
    assert not list(run_dir.glob(".uploads*")), "the records are written through renamed temp files"

    events = _events(run_dir)
    assert [e["event"] for e in events] == ["started", "upload", "upload"]
    assert events[1]["file"] == "output/mylora-000001.safetensors"
    assert events[1]["url"] == f"{PREFIX}/output/mylora-000001.safetensors"
    assert events[1]["size"] == 1200

    assert sync_once(store=s3_store, run_dir=run_dir).uploaded == []

    output = run_dir / "output"
    (output / ".mylora-000002.safetensors.tmp").rename(output / "mylora-000002.safetensors")
    (run_dir / "output" / "mylora.safetensors").write_bytes(b"final lora")
    assert sync_once(store=s3_store, run_dir=run_dir).uploaded == [
        "output/mylora-000002.safetensors",
        "output/mylora.safetensors",
    ]
    (run_dir / "output" / "mylora.safetensors").write_bytes(b"final lora, rewritten after resume")
    assert sync_once(store=s3_store, run_dir=run_dir).uploaded == ["output/mylora.safetensors"]
    assert s3_store.fs.cat_file(s3_store.path(f"{RUN_ID}/output/mylora.safetensors")).endswith(b"resume")
    assert set(json.loads((run_dir / "uploads.json").read_text())) == {
        "output/mylora-000001.safetensors",
        "output/mylora-000002.safetensors",
        "output/mylora.safetensors",
        "samples/000010-0.png",
    }


def test_upload_is_retried_until_the_bucket_appears(
    moto_server: object, s3_store: RemoteStore, run_dir: Path
) -> None:
    delays: list[float] = []

    def bucket_appears_during_backoff(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 2:
            s3_store.fs.mkdir("artifacts")

    local = run_dir / "samples" / "000010-0.png"
    url = upload_file(
        store=s3_store,
        local_path=local,
        key=f"{RUN_ID}/samples/000010-0.png",
        attempts=4,
        backoff_s=0.25,
        sleep=bucket_appears_during_backoff,
    )
    assert url == f"{PREFIX}/samples/000010-0.png"
    assert delays == [0.25, 0.5]
    assert s3_store.fs.cat_file(s3_store.path(f"{RUN_ID}/samples/000010-0.png")) == local.read_bytes()


def test_upload_file_gives_up_with_a_clear_error_and_keeps_the_file(
    moto_server: object, s3_store: RemoteStore, run_dir: Path
) -> None:
    local = run_dir / "output" / "mylora-000001.safetensors"
    before = local.read_bytes()
    with pytest.raises(UploadError, match="mylora-000001.safetensors to s3://artifacts/.*failed"):
        upload_file(
            store=s3_store, local_path=local, key=f"{RUN_ID}/output/x", attempts=2, sleep=lambda _: None
        )
    assert local.read_bytes() == before


def test_server_down_then_up_fails_then_uploads_without_losing_files(
    s3_env: str, s3_store: RemoteStore, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    checkpoint = run_dir / "output" / "mylora-000001.safetensors"
    before = checkpoint.read_bytes()

    report = sync_once(store=s3_store, run_dir=run_dir, attempts=1, backoff_s=2.0)
    assert report.failed == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
    assert checkpoint.read_bytes() == before
    state = load_state(run_dir)
    assert state.uploaded == {}
    assert json.loads((run_dir / "uploads.json").read_text()) == {}
    failed = state.failed["output/mylora-000001.safetensors"]
    assert failed.attempts == 1 and "Could not connect" in failed.error
    assert failed.next_attempt_at == pytest.approx(failed.last_attempt_at + 4.0)
    failure_events = [e for e in _events(run_dir) if e["event"] == "upload_failed"]
    assert [e["file"] for e in failure_events] == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
    assert failure_events[0]["attempts"] == 1 and failure_events[0]["retry_in"] == 4.0

    assert sync_once(store=s3_store, run_dir=run_dir).pending == [
        "output/mylora-000001.safetensors",
        "samples/000010-0.png",
    ], "a failed file waits for its backoff before the next try"

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(s3_env.rsplit(":", 1)[1]), verbose=False)
    server.start()
    try:
        httpx.post(f"{s3_env}/moto-api/reset", timeout=10).raise_for_status()
        s3_store.fs.mkdir("artifacts")
        report = sync_once(store=s3_store, run_dir=run_dir, force=True)
        assert report.uploaded == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
        assert load_state(run_dir).failed == {}
        assert s3_store.fs.cat_file(s3_store.path(f"{RUN_ID}/output/mylora-000001.safetensors")) == before
    finally:
        server.stop()

    secret = "testing-secret-value"
    assert secret not in caplog.text
    assert secret not in (run_dir / "events.jsonl").read_text()
    assert secret not in (run_dir / "uploads-state.json").read_text()


def test_final_sync_gives_up_after_its_passes_and_says_so(s3_store: RemoteStore, run_dir: Path) -> None:
    naps: list[float] = []
    report = final_sync(store=s3_store, run_dir=run_dir, passes=2, backoff_s=0.1, sleep=naps.append)
    assert report.failed == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
    assert naps == [0.2]
    last = [e for e in _events(run_dir) if e["event"] == "upload_failed"][-2:]
    assert [e["retry_in"] for e in last] == [None, None]
    assert [e["attempts"] for e in last] == [2, 2]
    assert (run_dir / "output" / "mylora-000001.safetensors").exists()


def test_artifact_sync_watches_the_run_and_flushes_at_the_end(
    moto_server: object, s3_store: RemoteStore, run_dir: Path
) -> None:
    s3_store.fs.mkdir("artifacts")
    with ArtifactSync(store=s3_store, run_dir=run_dir, interval_s=0.05):
        (run_dir / "output" / "mylora-000002.safetensors").write_bytes(b"checkpoint-2")
        deadline = time.monotonic() + 20
        while remote_url(run_dir, "output/mylora-000002.safetensors") is None:
            assert time.monotonic() < deadline, "the watcher never uploaded the new checkpoint"
            time.sleep(0.05)
        (run_dir / "output" / "mylora.safetensors").write_bytes(b"final")
    assert remote_url(run_dir, "output/mylora.safetensors") == f"{PREFIX}/output/mylora.safetensors"
    uploads = [e["file"] for e in _events(run_dir) if e["event"] == "upload"]
    assert sorted(uploads) == [
        "output/mylora-000001.safetensors",
        "output/mylora-000002.safetensors",
        "output/mylora.safetensors",
        "samples/000010-0.png",
    ]


def test_final_sync_stops_at_its_deadline_and_reports_what_was_left(
    s3_store: RemoteStore, run_dir: Path
) -> None:
    report = final_sync(store=s3_store, run_dir=run_dir, deadline_s=0, sleep=lambda _: None)
    assert report.uploaded == [] and report.failed == []
    assert report.pending == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
    gave_up = [e for e in _events(run_dir) if e["event"] == "upload_failed"]
    assert [(e["file"], e["retry_in"], e["attempts"]) for e in gave_up] == [
        ("output/mylora-000001.safetensors", None, 0),
        ("samples/000010-0.png", None, 0),
    ]
    assert "ran out of its 0 s" in gave_up[0]["error"]
    assert (run_dir / "samples" / "000010-0.png").exists()


def test_a_checkpoint_removed_on_purpose_loses_its_remote_copy_and_a_vanished_one_keeps_it(
    moto_server: object, s3_store: RemoteStore, run_dir: Path
) -> None:
    s3_store.fs.mkdir("artifacts")
    (run_dir / "output" / "mylora-000002.safetensors").write_bytes(b"checkpoint-2")
    sync_once(store=s3_store, run_dir=run_dir)
    first, second = (run_dir / "output" / f"mylora-00000{epoch}.safetensors" for epoch in (1, 2))
    first.unlink()  # keep_best_only's removal, recorded as the trainer records it
    RunDir(run_dir).note_removed([first])
    second.unlink()  # gone without a record: its remote copy is the backup

    report = sync_once(store=s3_store, run_dir=run_dir)
    assert report.removed == ["output/mylora-000001.safetensors"]
    assert not s3_store.fs.exists(s3_store.path(f"{RUN_ID}/output/mylora-000001.safetensors"))
    kept = s3_store.path(f"{RUN_ID}/output/mylora-000002.safetensors")
    assert s3_store.fs.cat_file(kept) == b"checkpoint-2"
    assert json.loads((run_dir / "uploads.json").read_text()) == {
        "output/mylora-000002.safetensors": f"{PREFIX}/output/mylora-000002.safetensors",
        "samples/000010-0.png": f"{PREFIX}/samples/000010-0.png",
    }
    removed = [e for e in _events(run_dir) if e["event"] == "upload_removed"]
    assert removed == [
        {
            "event": "upload_removed",
            "time": removed[0]["time"],
            "file": "output/mylora-000001.safetensors",
            "url": f"{PREFIX}/output/mylora-000001.safetensors",
        }
    ]
    assert sync_once(store=s3_store, run_dir=run_dir).removed == [], "deleted once"


def test_a_failed_remote_deletion_is_tried_again_by_the_final_sync(
    moto_server: object, s3_store: RemoteStore, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_store.fs.mkdir("artifacts")
    sync_once(store=s3_store, run_dir=run_dir)
    checkpoint = run_dir / "output" / "mylora-000001.safetensors"
    checkpoint.unlink()
    RunDir(run_dir).note_removed([checkpoint])
    real_rm = s3_store.fs.rm_file
    calls: list[str] = []

    def flaky_rm(path: str, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise ConnectionError("the endpoint went away")
        real_rm(path, **kwargs)

    monkeypatch.setattr(s3_store.fs, "rm_file", flaky_rm)
    report = final_sync(store=s3_store, run_dir=run_dir, backoff_s=0.01, sleep=lambda _: None)
    assert report.removed == ["output/mylora-000001.safetensors"] and report.remove_failed == []
    assert len(calls) == 2
    assert not s3_store.fs.exists(s3_store.path(f"{RUN_ID}/output/mylora-000001.safetensors"))
    failed = [e for e in _events(run_dir) if e["event"] == "upload_remove_failed"]
    assert len(failed) == 1 and "the endpoint went away" in failed[0]["error"]


def test_a_removed_name_that_is_back_on_disk_keeps_its_remote_copy(
    moto_server: object, s3_store: RemoteStore, run_dir: Path
) -> None:
    s3_store.fs.mkdir("artifacts")
    checkpoint = run_dir / "output" / "mylora-000001.safetensors"
    RunDir(run_dir).note_removed([checkpoint])  # listed, yet the file is there
    report = sync_once(store=s3_store, run_dir=run_dir)
    assert "output/mylora-000001.safetensors" in report.uploaded and report.removed == []
    assert s3_store.fs.exists(s3_store.path(f"{RUN_ID}/output/mylora-000001.safetensors"))
