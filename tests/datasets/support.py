"""Support for dataset tests: a real HTTP server on 127.0.0.1 with canned replies and a log of hits,
image encoding, and checks on what a dataset folder holds.

Tests import it as `from tests.datasets import support` (pytest's importlib mode).
"""

from __future__ import annotations

import io
import os
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    trickle: float = 0.0
    content_length: int | None = None  # None: the body's length; -1: no header, the body ends at close
    gate: threading.Event | None = None  # when given, the reply waits (up to 10 s) until it is set


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        reply = self.server.routes.get(self.path) or self.server.routes.get(self.path.split("?", 1)[0])
        if reply is None:
            reply = Reply(status=404, body=b"no such path")
        with self.server.count_lock:
            self.server.requests_open += 1
            self.server.peak_requests = max(self.server.peak_requests, self.server.requests_open)
        if reply.gate is not None:
            reply.gate.wait(10)
        if reply.delay:
            time.sleep(reply.delay)
        with self.server.count_lock:
            self.server.requests_open -= 1
        try:
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            length = reply.content_length if reply.content_length is not None else len(reply.body)
            if length >= 0:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            if reply.trickle:
                for index in range(len(reply.body)):
                    self.wfile.write(reply.body[index : index + 1])
                    self.wfile.flush()
                    time.sleep(reply.trickle)
            else:
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            return


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"


class LoopbackServer(ThreadingHTTPServer):
    """Plain HTTP on `host`; HTTPS when given a server TLS context, its URLs then naming `url_host`.

    It counts connections (opened in all, open at once at the peak) and requests being answered at
    once (counted until the reply starts, so a client can never see one end before the count
    drops); `keep_alive` answers HTTP/1.1 and keeps connections open; `reset_first` connections are
    reset (TCP RST) as soon as they are accepted.
    """

    daemon_threads = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        tls: ssl.SSLContext | None = None,
        url_host: str | None = None,
        keep_alive: bool = False,
        reset_first: int = 0,
    ) -> None:
        super().__init__((host, 0), _KeepAliveHandler if keep_alive else _Handler)
        self.count_lock = threading.Lock()
        self.connections = 0
        self.connections_open = 0
        self.peak_connections = 0
        self.requests_open = 0
        self.peak_requests = 0
        self.resets_left = reset_first
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self.scheme = "https" if tls is not None else "http"
        self.host = url_host or host
        self.routes: dict[str, Reply] = {}
        self.hits: list[str] = []
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{path}"

    def add(self, path: str, reply: Reply) -> str:
        self.routes[path] = reply
        return self.url(path)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self.count_lock:
            reset = self.resets_left > 0
            self.resets_left -= reset
        if reset:
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self.count_lock:
            self.connections += 1
            self.connections_open += 1
            self.peak_connections = max(self.peak_connections, self.connections_open)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.count_lock:
                self.connections_open -= 1

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gives up (a refused certificate, a timeout) is expected here, not an error."""

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def assert_clean_folder(folder: Path) -> None:
    """After any request a dataset folder holds only finished JPEGs, captions and the manifest."""
    for path in folder.iterdir():
        assert path.is_file(), path
        assert path.suffix in {".jpg", ".txt"} or path.name == "manifest.json", path


def assert_baseline_jpeg(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.mode == "RGB"
        assert not image.info.get("progressive") and not image.info.get("progression")
        assert "exif" not in image.info
        image.load()
        return image.size


CRASH_MARKER = b"make-the-worker-die"


def prepare_or_die(folder: str, data: bytes, max_pixels: int) -> object:
    """`image_workers.prepare_into`, except that a body holding CRASH_MARKER kills the worker process."""
    from fluxtrain.datasets.image_workers import prepare_into

    if CRASH_MARKER in data:
        os._exit(70)
    return prepare_into(folder, data, max_pixels)


def echo_after(value: object, seconds: float) -> tuple[object, int]:
    """A worker job: `value` back after `seconds`, with the worker's pid."""
    time.sleep(seconds)
    return value, os.getpid()


def loaded_modules() -> list[str]:
    """A worker job: the modules its interpreter has imported."""
    return sorted(sys.modules)


def niceness() -> int:
    """A worker job: its process's nice value."""
    return os.nice(0)


def environment_names() -> list[str]:
    """A worker job: the names in its process's environment."""
    return sorted(os.environ)


class Unreadable(Exception):
    """An exception that pickles but does not unpickle: its constructor wants what it does not keep."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first} {second}")


def raise_unreadable() -> None:
    """A worker job whose failure cannot be read back by the parent."""
    raise Unreadable("cannot", "unpickle")
