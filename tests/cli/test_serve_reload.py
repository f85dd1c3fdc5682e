"""`fluxtrain serve --reload` (docker-compose.dev.yml's command) restarts on a source change."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import fluxtrain

pytestmark = pytest.mark.e2e

CLI = "from fluxtrain.cli.main import app; app()"


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return False


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_serve_reload_restarts_when_a_package_file_changes(tmp_path: Path) -> None:
    source = tmp_path / "src"
    package = Path(fluxtrain.__file__).parent
    shutil.copytree(package, source / "fluxtrain", ignore=shutil.ignore_patterns("__pycache__"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(source), "MOUNT_PATH": str(tmp_path / "data")}
    env["FLUXTRAIN_HOST"] = "127.0.0.1"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-c", CLI, "serve", "--reload", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/health"
        assert wait_until(lambda: healthy(url), 90), log.read_text()
        assert f"Will watch for changes in these directories: ['{source / 'fluxtrain'}']" in log.read_text()
        (source / "fluxtrain" / "names.py").touch()
        assert wait_until(lambda: "Reloading" in log.read_text(), 30), log.read_text()
        restarted = lambda: log.read_text().count("Application startup complete") == 2  # noqa: E731
        assert wait_until(restarted, 90), log.read_text()
        assert healthy(url)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
