"""Waiting for a service process that a test started to answer `/health`."""

from __future__ import annotations

import time
from pathlib import Path

import httpx


def wait_healthy(url: str, log: Path, *, timeout: float = 60) -> None:
    """Return once `url/health` answers 200; fail with the service's log when it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(log.read_text())
