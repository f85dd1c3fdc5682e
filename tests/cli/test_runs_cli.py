"""The run commands as a user runs them: a real CLI process against the service on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings
from tests.runs.service_doubles import use_trainer_double

TRAINER = textwrap.dedent(
    """
    import json, signal, sys, time, pathlib
    run_dir = pathlib.Path(sys.argv[1])
    steps = json.loads((run_dir / "run.json").read_text()).get("max_train_steps") or 3
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with (run_dir / "events.jsonl").open("a") as log:
        log.write(json.dumps({"event": "started", "total_steps": steps}) + "\\n")
        log.write("{half a line\\n")
        for step in range(1, steps + 1):
            if stop:
                sys.exit(0)
            time.sleep(0.1)
            log.write(json.dumps({"event": "step", "step": step, "loss": 0.5, "it_per_s": 10.0}) + "\\n")
            log.flush()
            print(f"step {step}", flush=True)
        out = run_dir / "output"
        out.mkdir()
        (out / "demo.safetensors").write_bytes(b"lora")
        log.write(json.dumps({"event": "finished", "step": steps}) + "\\n")
    print("trainer done", flush=True)
    """
)


@pytest.fixture
def service(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The service (uvicorn in a thread of this process) running a trainer double; yields its URL."""
    use_trainer_double(settings, monkeypatch, script=tmp_path / "trainer_double.py", source=TRAINER)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _cli(url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLUXTRAIN_API_KEY": "", "COLUMNS": "200"}
    code = "from fluxtrain.cli.main import app; app()"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "--url", url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _status(url: str, run_id: str) -> dict:
    return httpx.get(f"{url}/status/{run_id}", timeout=10).json()


def _wait_step(url: str, run_id: str) -> None:
    deadline = time.monotonic() + 30
    while _status(url, run_id)["progress"]["step"] < 1:
        assert time.monotonic() < deadline, "the run never made a step"
        time.sleep(0.1)


def _started_run(url: str, process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert " queued" in line, line
    return line.split()[1]


def test_train_follows_to_the_end_despite_a_half_written_event(service: str) -> None:
    process = _cli(service, "train", "demo", "--steps", "3")
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    assert "succeeded" in out and "demo.safetensors" in out


@pytest.mark.parametrize(("option", "expected"), [(None, "running"), ("--cancel-on-exit", "canceled")])
def test_ctrl_c_detaches_or_cancels(service: str, option: str | None, expected: str) -> None:
    process = _cli(service, "train", "demo", "--steps", "300", *([option] if option else []))
    run_id = _started_run(service, process)
    _wait_step(service, run_id)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 130, out
    deadline = time.monotonic() + 30
    while (status := _status(service, run_id)["status"]) != expected:
        assert time.monotonic() < deadline, f"run stayed {status}"
        time.sleep(0.1)
    if expected == "running":
        assert "detached" in out
        httpx.post(f"{service}/runs/{run_id}/cancel", timeout=10).raise_for_status()


def test_logs_follow_ends_when_the_run_ends(service: str) -> None:
    body = {"output_name": "demo", "max_train_steps": 15}
    run_id = httpx.post(f"{service}/train", json=body, timeout=10).json()["run_id"]
    _wait_step(service, run_id)
    process = _cli(service, "logs", run_id, "-f")
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    assert _status(service, run_id)["status"] == "succeeded"
    assert out.splitlines()[-1] == "trainer done"
    assert "step 15" in out


def test_runs_lists_whole_ids_on_a_narrow_terminal(service: str) -> None:
    body = {"output_name": "demo", "max_train_steps": 2}
    run_id = httpx.post(f"{service}/train", json=body, timeout=10).json()["run_id"]
    narrow = subprocess.run(
        [sys.executable, "-c", "from fluxtrain.cli.main import app; app()", "runs", "--url", service],
        env={**os.environ, "FLUXTRAIN_API_KEY": "", "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert narrow.returncode == 0, narrow.stderr
    assert run_id in narrow.stdout


def _run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from fluxtrain.cli.main import app; app()", *args, "--url", url],
        env={**os.environ, "FLUXTRAIN_API_KEY": "", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_no_follow_prints_only_the_run_id_and_errors_go_to_stderr(service: str) -> None:
    started = _run_cli(service, "train", "demo", "--steps", "1", "--no-follow")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    assert started.stdout == f"{run_id}\n"
    assert _status(service, run_id)["run_id"] == run_id
    missing = _run_cli(service, "status", "nope")
    assert missing.returncode == 1
    assert missing.stdout == "" and "404" in missing.stderr


def test_contact_sheet_writes_the_grid_and_downloads_it(
    service: str, settings: Settings, tmp_path: Path
) -> None:
    body = {"output_name": "demo", "max_train_steps": 1}
    run_id = httpx.post(f"{service}/train", json=body, timeout=10).json()["run_id"]
    deadline = time.monotonic() + 30
    while _status(service, run_id)["status"] != "succeeded":
        assert time.monotonic() < deadline, "the run did not succeed"
        time.sleep(0.1)
    samples = settings.runs_dir / run_id / "samples"
    samples.mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(samples / "demo_000001_00.png")
    process = _cli(service, "contact-sheet", run_id, "--output", str(tmp_path / "grid.jpg"))
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out
    assert out.splitlines()[-1] == "demo-grid.jpg"
    assert (tmp_path / "grid.jpg").read_bytes() == (samples / "demo-grid.jpg").read_bytes()
