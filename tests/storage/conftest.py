"""Real object-store servers on loopback: moto's S3 server and a GCS emulator, plus a run folder."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fluxtrain.settings import Settings
from fluxtrain.storage.remote import RemoteStore, open_remote


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Credentials and an endpoint for an S3 server on a free loopback port; returns its URL."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return endpoint


@pytest.fixture
def moto_server(s3_env: str) -> Iterator[object]:
    """moto's S3 API server listening on the endpoint that `s3_env` configured."""
    from moto.server import ThreadedMotoServer

    port = int(s3_env.rsplit(":", 1)[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    reset_moto(s3_env)
    yield server
    server.stop()


def reset_moto(endpoint: str) -> None:
    """moto keeps buckets in process-wide state shared by every server; each test starts empty."""
    httpx.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()


@pytest.fixture
def s3_store(tmp_path: Path, s3_env: str) -> RemoteStore:
    settings = Settings(
        mount_path=tmp_path / "data",
        cloud_storage_type="S3",
        storage_url="s3://artifacts/team/loras",
        _env_file=None,
    )
    store = open_remote(settings)
    assert store is not None
    return store


@pytest.fixture
def gcs_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The gcp-storage-emulator JSON API on loopback with bucket `artifacts`; gcsfs finds it by env."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="artifacts")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder as the trainer leaves it mid-run: a checkpoint, a sample and temp files."""
    run = tmp_path / "data" / "runs" / "20261125-abc123"
    (run / "output").mkdir(parents=True)
    (run / "samples").mkdir()
    (run / "state").mkdir()
    (run / "output" / "mylora-000001.safetensors").write_bytes(b"checkpoint-1" * 100)
    (run / "output" / ".mylora-000002.safetensors.tmp").write_bytes(b"half written")
    (run / "samples" / "000010-0.png").write_bytes(b"\x89PNG sample bytes")
    (run / "samples" / ".000020-0.png.part").write_bytes(b"partial")
    (run / "state" / "optimizer.pt").write_bytes(b"state is not an artifact")
    (run / "events.jsonl").write_text('{"event": "started", "time": 1.0}\n', encoding="utf-8")
    return run
