"""The image worker process: run pickled jobs from the parent, one at a time, in arrival order.

Started by `image_workers` as `python -m fluxtrain.datasets.image_worker FD`, a fresh interpreter
that imports only what image work needs (Pillow and the dataset modules), never the parent's
`__main__`: a worker forked from the service or the CLI would carry (or re-import) torch and
transformers. FD is this end of a socket pair. Every message either way is a frame, an 8-byte
big-endian length and a pickle: first the parent's `sys.path`, then jobs `(function, args)`;
this side answers `("ready",)` once, then `(True, value)` or `(False, exception)` per job.
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
import sys

FRAME_HEADER = struct.Struct("!Q")


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


def read_payload(sock: socket.socket) -> bytearray | None:
    """The next message's pickle, or None when the parent has gone."""
    header = _receive(sock, FRAME_HEADER.size)
    if header is None:
        return None
    return _receive(sock, FRAME_HEADER.unpack(header)[0])


def frame(message: object) -> bytes:
    """The message's frame, pickled straight behind its header (no second copy of a large body)."""
    buffer = io.BytesIO()
    buffer.write(bytes(FRAME_HEADER.size))
    pickle.dump(message, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    view = buffer.getbuffer()
    FRAME_HEADER.pack_into(view, 0, len(view) - FRAME_HEADER.size)
    del view
    return buffer.getvalue()


def _answer(payload: bytearray) -> bytes:
    try:
        function, args = pickle.loads(payload)
        return frame((True, function(*args)))
    except Exception as exc:
        try:
            return frame((False, exc))
        except Exception:
            return frame((False, RuntimeError(f"{type(exc).__name__}: {exc}")))


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    path = read_payload(sock)
    if path is None:
        return
    sys.path[:] = pickle.loads(path)
    import fluxtrain.datasets.image_workers  # noqa: F401  (Pillow and the jobs, before the first one)

    sock.sendall(frame(("ready",)))
    while (payload := read_payload(sock)) is not None:
        sock.sendall(_answer(payload))


if __name__ == "__main__":
    main(int(sys.argv[1]))
