"""The real service (uvicorn subprocess, tiny models, an API key) and headless Debian Chromium.

Playwright for Python drives `/usr/bin/chromium` through `executable_path`; no browser is
downloaded. Without that binary the browser tests are skipped, saying how to install it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from fluxtrain.dataset_config.request import DatasetConfig
from fluxtrain.dataset_config.service import create_dataset_config
from fluxtrain.settings import Settings
from fluxtrain.training.tiny import write_tiny_flux_files
from tests.datasets.support import LoopbackServer
from tests.service_process import wait_healthy

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
API_KEY = "page-test-key"
TRAIN_DATASET = "fast"
TRAIN_RESOLUTION = 64


class Service:
    """The service as a real process on a free loopback port, with FLUXTRAIN_API_KEY set."""

    def __init__(self, root: Path, caption_model: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.settings = Settings(mount_path=root / "data", fs_path=root / "models", _env_file=None)
        self.caption_model = caption_model
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        )

    def start(self) -> None:
        env = {
            **os.environ,
            "MOUNT_PATH": str(self.root / "data"),
            "FS_PATH": str(self.root / "models"),
            "CUDA_VISIBLE_DEVICES": "",
            "FLUXTRAIN_API_KEY": API_KEY,
            "FLUXTRAIN_ALLOW_NETWORKS": "127.0.0.0/8",
            "FLUXTRAIN_DOWNLOAD_TIMEOUT": "5",
            "FLUXTRAIN_CAPTION_MODEL": str(self.caption_model),
            "FLUXTRAIN_CAPTION_DEVICE": "cpu",
            "FLUXTRAIN_CANCEL_GRACE_SECONDS": "20",
        }
        command = [sys.executable, "-m", "uvicorn", "--factory", "fluxtrain.api.app:create_app"]
        with (self.root / "service.log").open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_healthy(self.url, self.root / "service.log", timeout=60)

    def restart(self) -> None:
        """Kill the service (its trainers live on in their own sessions) and start it again."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.start()

    def stop(self) -> None:
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


def _write_train_dataset(settings: Settings) -> None:
    """Two 64 px images with captions and a 64 px TOML: /create-dataset-config stops at 256 px,
    where one tiny step takes about 14 s on two cores instead of about 1 s."""
    folder = settings.datasets_dir / TRAIN_DATASET
    folder.mkdir(parents=True)
    for index, colour in enumerate([(200, 30, 30), (30, 200, 60)]):
        Image.new("RGB", (TRAIN_RESOLUTION, TRAIN_RESOLUTION), colour).save(folder / f"img{index}.jpg")
        (folder / f"img{index}.txt").write_text(f"zqx, a plain colour {index}")
    request = DatasetConfig(output_name=TRAIN_DATASET, trigger_word="zqx", num_repeats=1, min_bucket_reso=64)
    toml = create_dataset_config(settings=settings, request=request)
    toml.write_text(toml.read_text().replace("resolution = 1024", f"resolution = {TRAIN_RESOLUTION}"))


@pytest.fixture(scope="package")
def chromium_path() -> Path:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install chromium`")
    return CHROMIUM


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory, chromium_path: Path) -> Iterator[Service]:
    from fluxtrain.captioning.tiny import write_tiny_florence2

    root = tmp_path_factory.mktemp("web")
    florence = write_tiny_florence2(root / "tiny-florence")
    svc = Service(root, florence)
    write_tiny_flux_files(svc.settings.models_root)
    _write_train_dataset(svc.settings)
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="package")
def images() -> Iterator[LoopbackServer]:
    running = LoopbackServer().start()
    yield running
    running.stop()


@pytest.fixture(scope="package")
def browser(chromium_path: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        yield launched
        launched.close()
