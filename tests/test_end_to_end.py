"""The whole service through its HTTP API, on the tiny models and the CPU, with nothing stood in:
download from a loopback server -> caption with Florence-2 -> dataset config -> train -> status."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load

from fluxtrain.api.app import create_app
from fluxtrain.captioning.tiny import write_tiny_florence2
from fluxtrain.settings import Settings
from fluxtrain.training.tiny import write_tiny_flux_files


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[str]:
    folder = tmp_path / "www"
    folder.mkdir()
    for name, colour in (("red.png", "red"), ("green.webp", "green"), ("blue.png", "blue")):
        Image.new("RGB", (160, 128), colour).save(folder / name)
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TestClient]:
    models = tmp_path / "models"
    write_tiny_flux_files(models)
    write_tiny_florence2(models)
    settings = Settings(
        mount_path=tmp_path / "data",
        fs_path=models,
        caption_model="florence2",
        allow_networks=[ipaddress.ip_network("127.0.0.0/8")],
        _env_file=None,
    )
    with TestClient(create_app(settings)) as client:
        client.app.state.executor.poll_interval = 0.1
        yield client


def test_urls_to_a_trained_lora(service: TestClient, image_server: str) -> None:
    urls = [f"{image_server}/{name}" for name in ("red.png", "green.webp", "blue.png")]
    downloaded = service.post("/download-images", json={"urls": urls, "output_name": "e2e"})
    assert downloaded.status_code == 200, downloaded.text
    assert downloaded.json()["failed"] == {}
    assert sorted(Path(p).name for p in downloaded.json()["files"].values()) == [
        "blue.jpg",
        "green.jpg",
        "red.jpg",
    ]

    captioned = service.post(
        "/caption-images",
        json={"output_name": "e2e", "trigger_word": "sks", "max_new_tokens": 4, "num_beams": 1},
    )
    assert captioned.status_code == 200, captioned.text
    captions = captioned.json()["captions"]
    assert sorted(captions) == ["blue.jpg", "green.jpg", "red.jpg"]
    assert all(text.startswith("sks, ") for text in captions.values())

    config = service.post(
        "/create-dataset-config",
        json={"output_name": "e2e", "trigger_word": "sks", "resolution": 256, "num_repeats": 1},
    )
    assert config.status_code == 200, config.text
    assert config.json()["path"].endswith("datasets/e2e.toml")

    started = service.post(
        "/train", json={"output_name": "e2e", "max_train_steps": 3, "learning_rate": 1e-3, "network_dim": 4}
    )
    assert started.status_code == 200, started.text
    assert started.json()["message"] == "Training started"
    run_id = started.json()["run_id"]

    seen_steps: set[int] = set()
    deadline = time.monotonic() + 240
    while True:
        status = service.get(f"/status/{run_id}").json()
        seen_steps.add(status["progress"]["step"] or 0)
        if status["status"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "succeeded", status["error"]
    assert status["progress"]["step"] == status["progress"]["total_steps"] == 3
    assert [output["name"] for output in status["outputs"]] == ["e2e.safetensors"]

    lora = service.get(f"/runs/{run_id}/artifacts/e2e.safetensors")
    assert lora.status_code == 200
    weights = load(lora.content)
    assert weights and all("lora" in key for key in weights)
