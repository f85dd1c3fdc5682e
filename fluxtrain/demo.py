"""The one-command demo: the whole path, URLs to a LoRA, through the real service's HTTP API.

Everything runs on this machine and is stopped at the end: tiny randomly initialised models (the
real classes, FLUX's 8x autoencoder and 2x2 packing), a loopback server with a few generated
images and one broken URL, and the service itself as a child process in its own process group,
reading no `.env` (it runs inside the demo's data folder) and allowed to fetch from loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw
from rich.console import Console

from fluxtrain.rundir import RunDir

BUDGET_S = 120.0
NAME = "demo"
TRIGGER = "zqx"
RESOLUTION = 256
EPOCHS = 2
IMAGES = {"red-circle.png": "red", "green-square.jpg": "green", "blue-ring.png": "blue", "gold.webp": "gold"}
BROKEN = "broken.png"
SERVICE_START_S = 60.0
STOP_WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_images(folder: Path) -> list[str]:
    """A few distinct generated pictures plus one file that is no image at all (the broken URL)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, colour) in enumerate(IMAGES.items()):
        image = Image.new("RGB", (320, 288), "white")
        draw = ImageDraw.Draw(image)
        box = (40 + 10 * index, 40, 260, 250 - 10 * index)
        if "square" in name:
            draw.rectangle(box, fill=colour)
        elif "ring" in name:
            draw.ellipse(box, outline=colour, width=24)
        else:
            draw.ellipse(box, fill=colour)
        image.save(folder / name)
    (folder / BROKEN).write_bytes(b"this is not an image\n")
    return [*IMAGES, BROKEN]


@contextlib.contextmanager
def image_server(folder: Path) -> Iterator[str]:
    """Serve `folder` on a free loopback port for as long as the block runs."""
    handler = partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="demo-images", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        return


@dataclass
class ServiceProcess:
    """The service (uvicorn, as `fluxtrain serve` runs it) on a free loopback port, in its own process
    group."""

    data_dir: Path
    models_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "service.log"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXTRAIN_")}
        env.update(
            {
                "MOUNT_PATH": str(self.data_dir),
                "FS_PATH": str(self.models_dir),
                "PORT": str(self.port),
                "CLOUD_STORAGE_TYPE": "",
                "FLUXTRAIN_HOST": "127.0.0.1",
                "FLUXTRAIN_CAPTION_MODEL": "florence2",
                "FLUXTRAIN_ALLOW_NETWORKS": "127.0.0.1/32",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def start(self) -> None:
        """Spawn the service; `wait_ready` then waits for it, so its start-up overlaps other work."""
        command = [sys.executable, "-m", "uvicorn", "--factory", "fluxtrain.api.app:create_app"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.data_dir,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + SERVICE_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited at start; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"the service did not answer /health within {SERVICE_START_S:.0f} s")

    def stop(self) -> None:
        """SIGTERM to the service's process group, SIGKILL if it has not ended within the wait."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class DemoResult:
    run_id: str
    lora: Path
    samples: list[Path]


class Demo:
    """Drives the service through download -> caption -> config -> train -> LoRA, printing each step."""

    def __init__(self, *, data_dir: Path, console: Console, epochs: int = EPOCHS) -> None:
        self.data_dir = data_dir.resolve()
        self.models_dir = self.data_dir / "models"
        self.console = console
        self.epochs = epochs
        self.started = time.monotonic()
        self.service = ServiceProcess(self.data_dir, self.models_dir)
        self.run_id: str | None = None

    def step(self, text: str) -> None:
        self.console.print(f"[bold cyan][{time.monotonic() - self.started:5.1f} s][/] {text}")

    def note(self, text: str) -> None:
        self.console.print(f"          {text}", highlight=False)

    def build_models(self) -> None:
        from fluxtrain.captioning.tiny import write_tiny_florence2
        from fluxtrain.training.tiny import write_tiny_flux_files

        self.step("Building tiny randomly initialised models (the real classes, FLUX's 8x autoencoder)")
        florence = write_tiny_florence2(self.models_dir)
        files = write_tiny_flux_files(self.models_dir)
        self.note(f"Florence-2 captioner: {florence}")
        for role in ("pretrained_model", "ae", "clip_l", "t5xxl"):
            self.note(f"{role}: {files[role]}")

    def post(self, client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = client.post(path, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"POST {path} answered {response.status_code}: {response.text}")
        return response.json()

    def run(self) -> DemoResult:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.step(f"Data folder: {self.data_dir}")
        self.service.start()
        self.build_models()
        names = write_images(self.data_dir / "www")
        with image_server(self.data_dir / "www") as images:
            self.step(f"Image server on {images} with {len(names)} URLs (one of them is not an image)")
            self.service.wait_ready()
            self.step(f"Service up on {self.service.url} (log: {self.service.log_path})")
            with httpx.Client(base_url=self.service.url, timeout=httpx.Timeout(10, read=300)) as client:
                return self.drive(client, [f"{images}/{name}" for name in names])

    def drive(self, client: httpx.Client, urls: list[str]) -> DemoResult:
        self.step("POST /download-images")
        downloaded = self.post(client, "/download-images", {"urls": urls, "output_name": NAME})
        for url, path in downloaded["files"].items():
            self.note(f"[green]ok[/]     {url} -> {path}")
        for url, reason in downloaded["failed"].items():
            self.note(f"[red]failed[/] {url}: {reason}")

        self.step("POST /caption-images (Florence-2, tiny and untrained: the words are noise)")
        body = {"output_name": NAME, "trigger_word": TRIGGER, "max_new_tokens": 6, "num_beams": 1}
        captioned = self.post(client, "/caption-images", body)
        for image, caption in sorted(captioned["captions"].items()):
            self.note(f"{image}: {caption!r}")

        self.step("POST /create-dataset-config")
        body = {"output_name": NAME, "trigger_word": TRIGGER, "resolution": RESOLUTION, "num_repeats": 1}
        config = self.post(client, "/create-dataset-config", body)
        self.note(f"kohya dataset TOML: {config['path']}")

        self.step(f"POST /train ({self.epochs} epochs, a checkpoint each epoch, a sample image at the end)")
        train = {
            "output_name": NAME,
            "max_train_epochs": self.epochs,
            "save_every_n_epochs": 1,
            "sample_every_n_epochs": self.epochs,
            "sample_prompts": [f"{TRIGGER}, a red circle"],
            "sample_steps": 2,
            "learning_rate": 1e-3,
            "network_dim": 4,
            "gradient_checkpointing": False,
        }
        self.run_id = self.post(client, "/train", train)["run_id"]
        self.note(f"run {self.run_id}: GET {self.service.url}/status/{self.run_id}")
        status = self.follow(client, self.run_id)
        if status["status"] != "succeeded":
            raise RuntimeError(f"run {self.run_id} {status['status']}: {status.get('error')}")
        return self.report(status)

    def follow(self, client: httpx.Client, run_id: str) -> dict[str, Any]:
        """Poll /status until the run ends, printing each new step."""
        seen = (None, -1)
        while True:
            status = client.get(f"/status/{run_id}").json()
            progress = status["progress"]
            now = (status["status"], progress["step"])
            if now != seen:
                seen = now
                loss = f", loss {progress['loss']:.4f}" if progress["loss"] is not None else ""
                total = progress["total_steps"] or "?"
                self.note(f"{status['status']}: step {progress['step']}/{total}{loss}")
            if status["status"] not in ("queued", "running"):
                return status
            time.sleep(0.5)

    def report(self, status: dict[str, Any]) -> DemoResult:
        run_id = status["run_id"]
        folder = self.data_dir / "runs" / run_id
        outputs = status["outputs"]
        final = Path(outputs[-1]["path"])
        self.step(f"Run {run_id} succeeded; its folder: {folder}")
        for output in outputs:
            self.note(f"LoRA (epoch {output['epoch']}): {output['path']}")
        samples = sorted(RunDir(folder).samples.glob("*.png"))
        for sample in samples:
            self.note(f"sample image: {sample}")
        self.note(f"download: GET {self.service.url}/runs/{run_id}/artifacts/{final.name}")
        return DemoResult(run_id, final, samples)

    def cancel_unfinished(self) -> None:
        """Cancel the demo's run when the demo is interrupted, so no trainer outlives it."""
        if self.run_id is None or self.service.process is None or self.service.process.poll() is not None:
            return
        status_url = f"{self.service.url}/status/{self.run_id}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(status_url, timeout=10).json()["status"] not in ("queued", "running"):
                return
            httpx.post(f"{self.service.url}/runs/{self.run_id}/cancel", timeout=10)
            deadline = time.monotonic() + STOP_WAIT_S
            while time.monotonic() < deadline:
                if httpx.get(status_url, timeout=10).json()["status"] not in ("queued", "running"):
                    return
                time.sleep(0.5)
