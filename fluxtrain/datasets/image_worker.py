"""The image worker process: run pickled jobs from the parent, one at a time, in arrival order.

Started by `image_workers` as `python -m fluxtrain.datasets.image_worker FD`, a fresh interpreter
that imports only what image work needs (Pillow and the dataset modules), never the parent's
`__main__`: a worker forked from the service or the CLI would carry (or re-import) torch and
transformers. FD is this end of a socket pair.

Every message either way is one frame: its length (8 bytes, big-endian, not counting itself), the
count of raw parts (4 bytes) and their lengths (8 bytes each), a pickle, then the raw parts.
A job's argument that is a `bytes` of RAW_BYTES or more (a downloaded body) is a raw part, not
pickled: it goes from the parent's own buffer into the socket, so the body is never copied on the
way. Only the arguments themselves are looked at, so the rest pickles in C with no Python call per
object (a persistent-id hook, called for each, took framing a job from 4.4 to 6.9 us).
The parent first sends its `sys.path`, then jobs (`encode_job`: the function, its arguments with
None where a raw part goes, and those positions); this side answers `("ready",)` once, then
`(True, value)` or `(False, exception)` per job.

A worker runs NICENESS steps below its parent: image work is batch work, and whenever the parent's
event loop (fetching, serving the API) or anything else on the host needs a core, it gets it first;
the workers still take every cycle left over. Measured against a ThreadingHTTPServer on the same two
cores (README, Downloads), this took the download from 4.72-4.77 s to 4.36-4.51 s.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

LENGTH = struct.Struct("!Q")
COUNT = struct.Struct("!I")
RAW_BYTES = 64 * 1024
NICENESS = 10


def encode(message: object, raw: Sequence[bytes] = ()) -> list[bytes]:
    """The frame of `message` and then `raw`, as the parts to write in order (`raw` unchanged)."""
    pickled = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    lengths = [len(part) for part in raw]
    header = COUNT.pack(len(raw)) + b"".join(map(LENGTH.pack, lengths))
    return [LENGTH.pack(len(header) + len(pickled) + sum(lengths)) + header + pickled, *raw]


def decode(body: memoryview) -> tuple[Any, list[bytes]]:
    """The message of a frame's `body` (the frame less its length) and its raw parts."""
    (count,) = COUNT.unpack_from(body)
    lengths = [LENGTH.unpack_from(body, COUNT.size + LENGTH.size * index)[0] for index in range(count)]
    start = COUNT.size + LENGTH.size * count
    end = len(body) - sum(lengths)
    message = pickle.loads(body[start:end])
    raw = []
    for length in lengths:
        raw.append(bytes(body[end : end + length]))
        end += length
    return message, raw


def encode_job(function: Callable[..., Any], args: tuple[Any, ...]) -> list[bytes]:
    """The frame of the job `function(*args)`: an argument that is a `bytes` of RAW_BYTES or more
    travels as a raw part, the rest pickled."""
    pickled = list(args)
    raw_at = []
    for index, arg in enumerate(args):
        if type(arg) is bytes and len(arg) >= RAW_BYTES:
            pickled[index] = None
            raw_at.append(index)
    return encode((function, pickled, raw_at), [args[index] for index in raw_at])


def decode_job(body: memoryview) -> tuple[Callable[..., Any], list[Any]]:
    """The function and arguments of a job's frame (`encode_job`)."""
    (function, args, raw_at), raw = decode(body)
    for index, part in zip(raw_at, raw, strict=True):
        args[index] = part
    return function, args


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
        function, args = decode_job(body)
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
    """Serve jobs until the parent closes its end (or it went away: no traceback then)."""
    os.nice(NICENESS)
    sock = socket.socket(fileno=fd)
    try:
        path = read_frame(sock)
        if path is None:
            return
        sys.path[:] = decode(path)[0]
        import fluxtrain.datasets.image_workers  # noqa: F401  (Pillow and the jobs, before the first one)

        _send(sock, encode(("ready",)))
        while (body := read_frame(sock)) is not None:
            _send(sock, _answer(body))
    except ConnectionError:
        return


if __name__ == "__main__":
    main(int(sys.argv[1]))
