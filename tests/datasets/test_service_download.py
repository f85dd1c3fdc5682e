"""Downloads through the real service process (uvicorn) from a loopback image server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.datasets import support
from tests.datasets.support import LoopbackServer, Reply
from tests.service_process import wait_healthy

HEALTH_IMAGES = 1000
HEALTH_SIDE = 192
HEALTH_BOUND_S = 0.1
BIG_LIST = 10_000
# Growth of the service process's RSS over its idle size during a 10,000-URL request.
BIG_LIST_RSS_GROWTH_MB = 120
# An image worker is a fresh interpreter holding Pillow: tens of MB (a worker that had imported
# torch, as forked workers did under the console script, held 260 MB).
WORKER_RSS_BOUND_MB = 100
FIRST_DOWNLOAD_BOUND_S = 1.0


class ServiceProcess:
    """`uvicorn fluxtrain.api.app:create_app` on a free loopback port, fetching from loopback."""

    def __init__(self, root: Path, *, console_script: bool = False, **env: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / "service.log"
        environment = {
            **os.environ,
            "MOUNT_PATH": str(root / "data"),
            "FLUXTRAIN_API_KEY": "",
            "FLUXTRAIN_ALLOW_NETWORKS": "127.0.0.0/8",
            "FLUXTRAIN_DOWNLOAD_PER_HOST": "32",
            **env,
        }
        if console_script:
            command = [str(Path(sys.executable).with_name("fluxtrain")), "serve"]
        else:
            command = [sys.executable, "-m", "uvicorn", "--factory", "fluxtrain.api.app:create_app"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(port)],
                env=environment,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd=root,
            )
        wait_healthy(self.url, self.log, timeout=60)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    running = ServiceProcess(tmp_path_factory.mktemp("service"))
    yield running
    running.stop()


def _noisy_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return support.encode(Image.fromarray(pixels, "RGB"), "PNG")


def test_health_answers_within_100_ms_during_a_download(
    service: ServiceProcess, server: LoopbackServer
) -> None:
    bodies = [_noisy_png(HEALTH_SIDE, seed) for seed in range(4)]
    urls = [server.add(f"/h/{index}.png", Reply(body=bodies[index % 4])) for index in range(HEALTH_IMAGES)]
    answer: dict[str, httpx.Response] = {}

    def download() -> None:
        answer["response"] = httpx.post(
            f"{service.url}/download-images", json={"urls": urls, "output_name": "busy"}, timeout=120
        )

    worker = threading.Thread(target=download)
    latencies: list[float] = []
    with httpx.Client(base_url=service.url, timeout=5) as client:
        client.get("/health")
        worker.start()
        while worker.is_alive():
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
    worker.join()
    body = answer["response"].json()
    assert answer["response"].status_code == 200 and body["failed"] == {}
    assert len(body["files"]) == HEALTH_IMAGES
    assert len(latencies) >= 10, "the download ended before /health was asked often enough"
    ordered = sorted(latencies)
    print(f"/health during the download: {len(ordered)} answers, slowest {ordered[-3:]}")
    # The 2-core test machine is shared: one answer in twenty may meet a scheduling hiccup of the
    # test process itself, so the bound holds for the 95th percentile, and every answer within 1 s.
    assert ordered[int(0.95 * (len(ordered) - 1))] < HEALTH_BOUND_S, ordered[-5:]
    assert ordered[-1] < 1.0, ordered[-5:]


def test_under_the_console_script_the_first_download_is_quick_and_workers_are_light(
    tmp_path: Path, server: LoopbackServer
) -> None:
    """`fluxtrain serve` imports the CLI (torch, transformers); its image workers must not."""
    running = ServiceProcess(tmp_path, console_script=True)
    try:
        urls = [server.add(f"/first/{index}.png", Reply(body=_noisy_png(64, index))) for index in range(4)]
        started = time.perf_counter()
        response = httpx.post(
            f"{running.url}/download-images", json={"urls": urls, "output_name": "first"}, timeout=60
        )
        elapsed = time.perf_counter() - started
        assert response.status_code == 200 and response.json()["failed"] == {}
        workers = [
            child
            for child in psutil.Process(running.process.pid).children(recursive=True)
            if "fluxtrain.datasets.image_worker" in child.cmdline()
        ]
        assert len(workers) == os.cpu_count()
        for worker in workers:
            mapped = Path(f"/proc/{worker.pid}/maps").read_text()
            assert "libtorch" not in mapped and "transformers" not in mapped
            assert worker.memory_info().rss / 2**20 < WORKER_RSS_BOUND_MB
    finally:
        running.stop()
    assert elapsed < FIRST_DOWNLOAD_BOUND_S, f"first download took {elapsed:.2f} s"


def test_ten_thousand_urls_in_one_request_keep_memory_bounded(
    service: ServiceProcess, server: LoopbackServer
) -> None:
    tiny = support.encode(Image.new("RGB", (16, 16), (90, 30, 160)), "PNG")
    urls = [server.add(f"/big/{index}.png", Reply(body=tiny)) for index in range(BIG_LIST)]
    process = psutil.Process(service.process.pid)
    idle_rss = process.memory_info().rss
    peak = [idle_rss]
    answer: dict[str, httpx.Response] = {}

    def download() -> None:
        answer["response"] = httpx.post(
            f"{service.url}/download-images", json={"urls": urls, "output_name": "big"}, timeout=600
        )

    worker = threading.Thread(target=download)
    worker.start()
    seen_running = False
    with httpx.Client(base_url=service.url, timeout=5) as client:
        while worker.is_alive():
            peak.append(process.memory_info().rss)
            progress = client.get("/datasets/big/downloads")
            seen_running |= progress.status_code == 200 and progress.json()["running"]
            time.sleep(0.1)
    worker.join()
    body = answer["response"].json()
    assert answer["response"].status_code == 200, body
    assert body["failed"] == {} and len(body["files"]) == BIG_LIST
    assert seen_running
    growth_mb = (max(peak) - idle_rss) / 2**20
    print(f"10,000 URLs: idle RSS {idle_rss / 2**20:.0f} MB, peak growth {growth_mb:.0f} MB")
    assert growth_mb < BIG_LIST_RSS_GROWTH_MB
