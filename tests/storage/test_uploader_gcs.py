"""Artifact uploads against a GCS emulator (gcp-storage-emulator's JSON API) on loopback, through gcsfs."""

from __future__ import annotations

import json
from pathlib import Path

from fluxtrain.settings import Settings
from fluxtrain.storage.remote import open_remote
from fluxtrain.storage.uploader import load_state, sync_once


def test_checkpoint_and_sample_land_in_the_gcs_bucket(gcs_server: str, tmp_path: Path, run_dir: Path) -> None:
    settings = Settings(
        mount_path=tmp_path / "data",
        cloud_storage_type="GCS",
        storage_url="gs://artifacts/loras",
        _env_file=None,
    )
    store = open_remote(settings)
    assert store is not None

    report = sync_once(store=store, run_dir=run_dir)
    assert report.uploaded == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
    key = f"artifacts/loras/{run_dir.name}/output/mylora-000001.safetensors"
    assert store.fs.cat_file(key) == (run_dir / "output" / "mylora-000001.safetensors").read_bytes()
    sample = f"artifacts/loras/{run_dir.name}/samples/000010-0.png"
    assert store.fs.cat_file(sample) == (run_dir / "samples" / "000010-0.png").read_bytes()
    assert json.loads((run_dir / "uploads.json").read_text())["samples/000010-0.png"] == f"gs://{sample}"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["started", "upload", "upload"]


def test_missing_gcs_bucket_is_reported_and_the_file_kept(
    gcs_server: str, tmp_path: Path, run_dir: Path
) -> None:
    settings = Settings(
        mount_path=tmp_path / "data",
        cloud_storage_type="GCS",
        storage_url="gs://no-such-bucket",
        _env_file=None,
    )
    store = open_remote(settings)
    assert store is not None
    report = sync_once(store=store, run_dir=run_dir, attempts=1)
    assert report.failed == ["output/mylora-000001.safetensors", "samples/000010-0.png"]
    assert "no-such-bucket" in load_state(run_dir).failed["samples/000010-0.png"].error
    assert (run_dir / "samples" / "000010-0.png").exists()
