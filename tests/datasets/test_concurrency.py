"""Writers racing on one dataset: two processes, a lock held elsewhere, deletion mid-batch, the manifest
following the files while a batch runs."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.datasets import ledger
from fluxtrain.datasets.catalog import describe_dataset
from fluxtrain.datasets.ingest import DownloadResult, download_images
from fluxtrain.datasets.locks import lock_path
from fluxtrain.datasets.store import delete_dataset, read_manifest
from fluxtrain.errors import NotFoundError
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer, Reply, assert_clean_folder, encode

DELETED = "the dataset was deleted during the download"

_DOWNLOAD_SCRIPT = """
import asyncio, ipaddress, json, sys
from fluxtrain.datasets.ingest import download_images
from fluxtrain.settings import Settings
settings = Settings(mount_path=sys.argv[1], allow_networks=[ipaddress.ip_network("127.0.0.0/8")],
                    download_concurrency=4, download_timeout=20, _env_file=None)
result = asyncio.run(download_images(settings=settings, name="set", urls=sys.argv[2:]))
print(json.dumps({"files": result.files, "failed": result.failed}))
"""

_HOLD_LOCK_SCRIPT = """
import sys
from pathlib import Path
from fluxtrain.datasets.locks import dataset_lock
with dataset_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def _python(script: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.Popen([sys.executable, "-c", script, *args], text=True, env=env, **kwargs)


def _color(index: int) -> tuple[int, int, int]:
    return (index * 8 % 256, 255 - index * 8 % 256, index * 40 % 256)


def test_two_processes_downloading_into_one_dataset_lose_nothing(
    server: LoopbackServer, open_settings: Settings
) -> None:
    gate = threading.Event()
    bodies: dict[str, bytes] = {}
    colors: dict[str, tuple[int, int, int]] = {}
    batches: list[list[str]] = []
    for proc in range(2):
        batch = []
        for i in range(12):
            color = _color(proc * 12 + i)
            body = encode(Image.new("RGB", (16, 16), color), "PNG")
            url = server.add(f"/p{proc}/{i}/img.png", Reply(body=body, gate=gate))
            bodies[url], colors[url] = body, color
            batch.append(url)
        batches.append(batch)
    data_root = str(open_settings.data_root)
    procs = [_python(_DOWNLOAD_SCRIPT, data_root, *batch, stdout=subprocess.PIPE) for batch in batches]
    deadline = time.monotonic() + 30
    while not all(any(hit.startswith(f"/p{p}/") for hit in server.hits) for p in range(2)):
        assert time.monotonic() < deadline, "both processes should have started fetching"
        time.sleep(0.02)
    gate.set()
    results = [json.loads(proc.communicate(timeout=60)[0]) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]

    folder = open_settings.datasets_dir / "set"
    assert_clean_folder(folder)
    files = {url: path for result in results for url, path in result["files"].items()}
    assert all(result["failed"] == {} for result in results)
    assert set(files) == set(bodies)
    assert len(set(files.values())) == 24
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (
        sorted(manifest)
        == sorted(p.name for p in folder.glob("*.jpg"))
        == sorted(Path(p).name for p in files.values())
    )
    for url, path in files.items():
        entry = manifest[Path(path).name]
        assert entry["url"] == url
        assert entry["sha256"] == hashlib.sha256(bodies[url]).hexdigest()
        with Image.open(path) as saved:
            pixel = saved.convert("RGB").getpixel((8, 8))
        assert all(abs(a - b) <= 8 for a, b in zip(pixel, colors[url], strict=True)), (url, pixel)
    assert not lock_path(folder).is_relative_to(folder)


def test_a_lock_held_by_another_process_holds_commits_back(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    folder = open_settings.datasets_dir / "set"
    url = server.add("/held/img.png", Reply(body=png_bytes))
    holder = _python(_HOLD_LOCK_SCRIPT, str(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        outcome: list[DownloadResult] = []
        worker = threading.Thread(
            target=lambda: outcome.append(
                asyncio.run(download_images(settings=open_settings, name="set", urls=[url]))
            )
        )
        worker.start()
        worker.join(0.8)
        assert worker.is_alive() and not outcome
        assert not folder.exists()
    finally:
        holder.communicate("", timeout=10)
    worker.join(10)
    assert Path(outcome[0].files[url]).is_file()
    assert set(read_manifest(folder)) == {"img.jpg"}


def test_the_manifest_grows_while_a_batch_runs(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "FLUSH_SECONDS", 0.2)
    urls = [server.add(f"/slow/{i}/pic.png", Reply(body=png_bytes, delay=0.5 * i)) for i in range(3)]
    folder = open_settings.datasets_dir / "set"
    seen: list[int] = []

    def on_result(_url: str, path: str | None, _reason: str | None) -> None:
        assert path is not None
        seen.append(len(read_manifest(folder)))

    asyncio.run(download_images(settings=open_settings, name="set", urls=urls, on_result=on_result))
    assert seen == [1, 2, 3]


def test_reading_drops_manifest_entries_of_vanished_files(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    urls = [server.add(f"/v/{i}/pic.png", Reply(body=png_bytes)) for i in range(2)]
    result = asyncio.run(download_images(settings=open_settings, name="set", urls=urls))
    Path(result.files[urls[0]]).unlink()
    folder = open_settings.datasets_dir / "set"
    assert len(json.loads((folder / "manifest.json").read_text())) == 2
    assert list(read_manifest(folder)) == [Path(result.files[urls[1]]).name]
    record = describe_dataset(settings=open_settings, name="set")
    assert [(image.file, image.manifest["url"]) for image in record.images] == [
        (Path(result.files[urls[1]]).name, urls[1])
    ]


def test_deleting_mid_batch_fails_the_rest_and_recreates_nothing(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    gate = threading.Event()
    first = server.add("/d/first.png", Reply(body=png_bytes))
    held = [server.add(f"/d/{i}/held.png", Reply(body=png_bytes, gate=gate)) for i in range(4)]
    folder = open_settings.datasets_dir / "set"
    outcome: list[DownloadResult] = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            asyncio.run(download_images(settings=open_settings, name="set", urls=[first, *held]))
        )
    )
    worker.start()
    deadline = time.monotonic() + 10
    while not (folder / "first.jpg").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    delete_dataset(open_settings, "set")
    gate.set()
    worker.join(15)
    assert outcome[0].files == {}
    assert outcome[0].failed == dict.fromkeys([first, *held], DELETED)
    assert not folder.exists()
    assert list(open_settings.datasets_dir.iterdir()) == []
    assert lock_path(folder) == open_settings.data_root / ".locks" / "set.lock"
    assert lock_path(folder).is_file()
    with pytest.raises(NotFoundError):
        describe_dataset(settings=open_settings, name="set")
