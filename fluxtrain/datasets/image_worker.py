"""The image worker process: run pickled jobs from the parent, one at a time, in arrival order.

Started by `image_workers` as `python -m fluxtrain.datasets.image_worker FD`, a fresh interpreter
that imports only what image work needs (Pillow and the dataset modules), never the parent's
`__main__`: a worker forked from the service or the CLI would carry (or re-import) torch and
transformers. FD is this end of a socket pair.

Every message either way is one frame: its length (8 bytes, big-endian, not counting itself), the
count of raw parts (4 bytes) and their lengths (8 bytes each), a pickle, then the raw parts.
A `bytes` of RAW_BYTES or more inside the message (a downloaded body) is a raw part, not pickled:
it goes from the parent's own buffer into the socket, so the body is never copied on the way.
The parent first sends its `sys.path`, then jobs `(function, args)`; this side answers
`("ready",)` once, then `(True, value)` or `(False, exception)` per job.

A worker runs NICENESS steps below its parent: image work is batch work, and whenever the parent's
event loop (fetching, serving the API) or anything else on the host needs a core, it gets it first;
the workers still take every cycle left over. Measured against a ThreadingHTTPServer on the same two
cores (README, Downloads), this took the download from 4.72-4.77 s to 4.36-4.51 s.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import struct
import sys
from typing import Any

LENGTH = struct.Struct("!Q")
COUNT = struct.Struct("!I")
RAW_BYTES = 64 * 1024
NICENESS = 10


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, raw: list[bytes]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.raw = raw

    def persistent_id(self, obj: object) -> int | None:
        if type(obj) is bytes and len(obj) >= RAW_BYTES:
            self.raw.append(obj)
            return len(self.raw) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, raw: list[bytes]) -> None:
        super().__init__(file)
        self.raw = raw

    def persistent_load(self, pid: int) -> bytes:
        return self.raw[pid]


def encode(message: object) -> list[bytes]:
    """The frame of `message`, as the parts to write in order (the raw ones are the caller's own)."""
    raw: list[bytes] = []
    buffer = io.BytesIO()
    _Pickler(buffer, raw).dump(message)
    pickled = buffer.getvalue()
    header = COUNT.pack(len(raw)) + b"".join(LENGTH.pack(len(part)) for part in raw)
    total = len(header) + len(pickled) + sum(len(part) for part in raw)
    return [LENGTH.pack(total) + header + pickled, *raw]


def decode(body: memoryview) -> Any:
    """The message of a frame's `body` (the frame less its length)."""
    (count,) = COUNT.unpack_from(body)
    lengths = [LENGTH.unpack_from(body, COUNT.size + LENGTH.size * index)[0] for index in range(count)]
    start = COUNT.size + LENGTH.size * count
    end = len(body) - sum(lengths)
    raw = []
    for length in lengths:
        raw.append(bytes(body[end : end + length]))
        end += length
    return _Unpickler(io.BytesIO(body[start : len(body) - sum(lengths)]), raw).load()


def frame_length(buffer: bytearray | memoryview) -> int:
    """The length of the frame whose first bytes `buffer` holds, its length field included."""
    return LENGTH.size + LENGTH.unpack_from(buffer)[0]


def _receive(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        got = sock.recv_into(view[filled:])
        if got == 0:
            return None
        filled += got
    return buffer


def read_frame(sock: socket.socket) -> memoryview | None:
    """The next frame's body, or None when the parent has gone."""
    head = _receive(sock, LENGTH.size)
    if head is None:
        return None
    body = _receive(sock, LENGTH.unpack(head)[0])
    return None if body is None else memoryview(body)


def _answer(body: memoryview) -> list[bytes]:
    try:
        function, args = decode(body)
        return encode((True, function(*args)))
    except Exception as exc:
        try:
            return encode((False, exc))
        except Exception:
            return encode((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


def _send(sock: socket.socket, parts: list[bytes]) -> None:
    for part in parts:
        sock.sendall(part)


def main(fd: int) -> None:
    os.nice(NICENESS)
    sock = socket.socket(fileno=fd)
    path = read_frame(sock)
    if path is None:
        return
    sys.path[:] = decode(path)
    import fluxtrain.datasets.image_workers  # noqa: F401  (Pillow and the jobs, before the first one)

    _send(sock, encode(("ready",)))
    while (body := read_frame(sock)) is not None:
        _send(sock, _answer(body))


if __name__ == "__main__":
    main(int(sys.argv[1]))
