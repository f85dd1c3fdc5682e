"""End to end: the real service (`uvicorn` subprocess) and the real trainer on the tiny models, on the CPU.

One service data root is shared by the tests of this module, which run in order: train (with a
second run queued behind it that fails), cancel, then kill the service mid-run (adopted), and
kill the whole tree mid-run (resumed from its saved state).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.runs.db import get_database
from fluxtrain.runs.service import get_run
from fluxtrain.settings import Settings
from fluxtrain.training.tiny import write_tiny_flux_files
from tests.service_process import wait_healthy

pytestmark = [pytest.mark.timeout(240), pytest.mark.e2e]
TINY = {"gradient_checkpointing": False, "mixed_precision": "no", "learning_rate": 1e-3}


class Service:
    """The service as a real process on a free loopback port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.settings = Settings(mount_path=root / "data", fs_path=root / "models", _env_file=None)

    def start(self) -> None:
        env = {
            **os.environ,
            "MOUNT_PATH": str(self.root / "data"),
            "FS_PATH": str(self.root / "models"),
            "CUDA_VISIBLE_DEVICES": "",
            "FLUXTRAIN_API_KEY": "",
        }
        command = [sys.executable, "-m", "uvicorn", "--factory", "fluxtrain.api.app:create_app"]
        with (self.root / "service.log").open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)], env=env, stdout=log, stderr=log
            )
        wait_healthy(self.url, self.root / "service.log", timeout=60)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def wait(self, run_id: str, until, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = httpx.get(f"{self.url}/status/{run_id}", timeout=10).json()
            if until(body):
                return body
            time.sleep(0.3)
        raise AssertionError(f"run {run_id} never got there: {body}")

    def events(self, run_id: str) -> list[dict]:
        path = self.settings.runs_dir / run_id / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def train(self, **body: object) -> str:
        response = httpx.post(f"{self.url}/train", json={**TINY, **body}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["run_id"]


def _group_alive(pgid: int) -> bool:
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except ProcessLookupError:
            continue
    return False


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("service")
    svc = Service(root)
    write_tiny_flux_files(svc.settings.models_root)
    images = svc.settings.datasets_dir / "demo"
    images.mkdir(parents=True)
    # 1024 px: 128x128 latents through the 8x autoencoder, 4,096 tokens, so a step takes long enough
    # for a killed and restarted service to find the trainer still running.
    for index, colour in enumerate([(200, 30, 30), (30, 200, 60)]):
        Image.new("RGB", (1024, 1024), colour).save(images / f"img{index}.jpg")
        (images / f"img{index}.txt").write_text(f"zqx, a plain colour {index}")
    request = DatasetConfig(output_name="demo", trigger_word="zqx", num_repeats=1, resolution=1024)
    create_dataset_config(settings=svc.settings, request=request)
    # Lint at /train passes the "broken" dataset (one good image); its folder is removed once the run
    # is queued, so the trainer, not /train, finds it gone.
    (root / "nowhere").mkdir()
    shutil.copy(images / "img0.jpg", root / "nowhere")
    broken = svc.settings.datasets_dir / "broken.toml"
    broken.write_text(
        (svc.settings.datasets_dir / "demo.toml").read_text().replace(str(images), str(root / "nowhere"))
    )
    svc.start()
    yield svc
    svc.stop()
    db = get_database(svc.settings)
    for run_dir in svc.settings.runs_dir.iterdir():
        ref = get_run(db=db, run_id=run_dir.name).backend_ref
        if ref and _group_alive(int(ref.split(":")[0])):
            os.killpg(int(ref.split(":")[0]), signal.SIGKILL)


def test_train_to_success_while_a_second_run_waits_then_fails(service: Service) -> None:
    first = service.train(output_name="demo", max_train_epochs=2, save_every_n_epochs=1)
    second = service.train(output_name="broken-run", dataset="broken")
    shutil.rmtree(service.root / "nowhere")
    running = service.wait(first, lambda b: b["progress"]["step"] >= 1)
    assert running["status"] == "running" and running["progress"]["total_steps"] == 4
    assert httpx.get(f"{service.url}/status/{second}").json()["status"] == "queued"

    timeout = httpx.Timeout(10, read=120)
    with httpx.stream("GET", f"{service.url}/runs/{first}/events", timeout=timeout) as stream:
        lines = list(stream.iter_lines())
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert data[-1]["status"] == "succeeded"
    assert [e["step"] for e in data[:-1] if e["event"] == "step"] == [1, 2, 3, 4]

    done = service.wait(first, lambda b: b["status"] != "running")
    assert done["status"] == "succeeded", done["error"]
    assert [o["name"] for o in done["outputs"]] == ["demo-000001.safetensors", "demo.safetensors"]
    assert [o["epoch"] for o in done["outputs"]] == [1, 2]
    assert done["progress"]["step"] == 4 and done["finished_at"]

    failed = service.wait(second, lambda b: b["status"] in ("succeeded", "failed", "canceled"))
    assert failed["status"] == "failed"
    assert "the trainer exited with code" in failed["error"] and "nowhere" in failed["error"]
    assert failed["started_at"] >= done["finished_at"]


def test_cancel_a_running_run_leaves_no_process(service: Service) -> None:
    run_id = service.train(output_name="demo", max_train_steps=200)
    service.wait(run_id, lambda b: b["progress"]["step"] >= 1)
    ref = get_run(db=get_database(service.settings), run_id=run_id).backend_ref
    pgid = int(ref.split(":")[0])
    assert _group_alive(pgid)
    response = httpx.post(f"{service.url}/runs/{run_id}/cancel", timeout=10)
    assert response.status_code == 200
    done = service.wait(run_id, lambda b: b["status"] != "running", timeout=60)
    assert done["status"] == "canceled"
    assert not _group_alive(pgid)
    assert [e["event"] for e in service.events(run_id)][-1] == "interrupted"


def test_service_killed_adopts_then_tree_killed_resumes(service: Service) -> None:
    db = get_database(service.settings)
    # Eight epochs (16 steps at 1024 px), so the trainer is still at work when the restarted
    # service looks (four finished during a restart on the idle 2-core machine).
    run_id = service.train(output_name="demo", max_train_epochs=8, save_every_n_epochs=1)
    service.wait(run_id, lambda b: any(e["event"] == "checkpoint" for e in service.events(run_id)))
    ref = get_run(db=db, run_id=run_id).backend_ref

    service.kill()
    pgid = int(ref.split(":")[0])
    assert _group_alive(pgid)
    service.start()
    adopted = service.wait(run_id, lambda b: b["progress"]["step"] >= 4)
    assert adopted["status"] == "running"
    assert get_run(db=db, run_id=run_id).backend_ref == ref and get_run(db=db, run_id=run_id).attempts == 1

    service.wait(run_id, lambda b: sum(e["event"] == "checkpoint" for e in service.events(run_id)) >= 2)
    service.kill()
    os.killpg(pgid, signal.SIGKILL)
    time.sleep(0.5)
    assert not _group_alive(pgid)
    service.start()
    done = service.wait(run_id, lambda b: b["status"] != "running" and b["status"] != "queued", timeout=150)
    assert done["status"] == "succeeded", done["error"]
    assert get_run(db=db, run_id=run_id).attempts == 2
    started = [e for e in service.events(run_id) if e["event"] == "started"]
    assert len(started) == 2
    steps = [e["step"] for e in service.events(run_id) if e["event"] == "step"]
    assert steps[-1] == 16 and len(done["outputs"]) == 8
