"""Client floors against the standard library's ThreadingHTTPServer, with the server's own timeline.

`download.py --side-by-side` puts fluxtrain level with img2dataset on its ThreadingHTTPServer row
(250 ms, 256 px PNG, concurrency 64), both about a tenth over the latency bound. This asks where
that tenth goes. The same server (a thread per connection, HTTP/1.0, in its own process on the
same cores) answers the same URLs to clients that do no image work at all (asyncio streams on one
loop, urllib in threads, one aiohttp session, aiohttp split over two processes) and to fluxtrain's
whole download, and notes per request when its connection was accepted, when its handler thread
started, when its request had been read and when its answer had been written. Each client
also times its own requests (fluxtrain's around its `fetch_bytes`, once the URL holds its slots) on
the server's clock: perf_counter is CLOCK_MONOTONIC, one clock for every process on Linux.

    .venv/bin/python bench/client_floor.py [--n 1000] [--concurrency 64] [--runs 3] \
        [--clients raw,threads,aiohttp,aiohttp-2proc,fluxtrain] [--workdir /work]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import aiohttp
import download

from fluxtrain.datasets.ingest import run_download

LATENCY = 0.25
SIDE = 256
Times = dict[str, tuple[float, float]]
"""Per request path: when the client started it and when it had the whole answer (perf_counter)."""
ServerTimes = dict[str, tuple[float, float, float, float]]
"""Per request path: accepted, handler thread started, request read, answer written (perf_counter)."""

_FORK = multiprocessing.get_context("fork")


def _serve(sock: socket.socket, bodies: list[bytes], served: Synchronized, control: Connection) -> None:
    """`download.py`'s threading server, plus the timeline, handed over (and cleared) on request."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    records: ServerTimes = {}
    accepted: dict[socket.socket, float] = {}

    class Server(ThreadingHTTPServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            request, address = super().get_request()
            accepted[request] = time.perf_counter()
            return request, address

    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            self.started = time.perf_counter()
            super().setup()

        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            read = time.perf_counter()
            time.sleep(LATENCY)
            body = download.with_text_chunk(bodies[zlib.crc32(self.path.encode()) % len(bodies)], self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            records[self.path] = (
                accepted.pop(self.request, math.nan),
                self.started,
                read,
                time.perf_counter(),
            )
            with served.get_lock():
                served.value += 1

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    def hand_over() -> None:
        while True:
            control.recv()
            taken = {path: records.pop(path) for path in list(records)}
            control.send(taken)

    threading.Thread(target=hand_over, daemon=True).start()
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.serve_forever()


def _raw(port: int, paths: list[str], concurrency: int) -> Times:
    """asyncio streams: connect, one request line and Host, read to the server's close."""
    times: Times = {}
    pending = iter(paths)

    async def fetcher() -> None:
        for path in pending:
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: floor\r\n\r\n".encode()
            )
            await reader.read()
            times[path] = (started, time.perf_counter())
            writer.close()

    async def batch() -> None:
        await asyncio.gather(*(fetcher() for _ in range(concurrency)))

    run_download(batch())
    return times


def _threads(port: int, paths: list[str], concurrency: int) -> Times:
    """A thread per connection, as img2dataset fetches (without its image work)."""
    times: Times = {}
    pending = iter(paths)
    lock = threading.Lock()

    def fetcher() -> None:
        while True:
            with lock:
                path = next(pending, None)
            if path is None:
                return
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                response.read()
            times[path] = (started, time.perf_counter())

    workers = [threading.Thread(target=fetcher) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return times


def _aiohttp(port: int, paths: list[str], concurrency: int) -> Times:
    """One aiohttp session with aiohttp's defaults and `concurrency` tasks: fluxtrain's transport alone."""
    times: Times = {}
    pending = iter(paths)

    async def batch() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def fetcher() -> None:
                for path in pending:
                    started = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                        await response.read()
                    times[path] = (started, time.perf_counter())

            await asyncio.gather(*(fetcher() for _ in range(concurrency)))

    run_download(batch())
    return times


def _aiohttp_child(port: int, paths: list[str], concurrency: int, answer: Connection) -> None:
    answer.send(_aiohttp(port, paths, concurrency))


def _aiohttp_two_processes(port: int, paths: list[str], concurrency: int) -> Times:
    """Two event loops on the two cores, half the connections each: is one loop the limit?"""
    pipes = [_FORK.Pipe(duplex=False) for _ in range(2)]
    children = [
        _FORK.Process(target=_aiohttp_child, args=(port, paths[index::2], concurrency // 2, pipes[index][1]))
        for index in range(2)
    ]
    for child in children:
        child.start()
    times: Times = {}
    for receiving, _ in pipes:
        times.update(receiving.recv())
    for child in children:
        child.join()
    return times


CLIENTS: dict[str, Callable[[int, list[str], int], Times]] = {
    "raw": _raw,
    "threads": _threads,
    "aiohttp": _aiohttp,
    "aiohttp-2proc": _aiohttp_two_processes,
}


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _fluxtrain(
    server: download.ImageServer, paths: list[str], concurrency: int
) -> tuple[float, float, Times]:
    """fluxtrain's whole download, as `download.py` runs it: wall, CPU (its image workers included)
    and each URL's fetch (`fetch_bytes`: from its request to its last byte, slots already held)."""
    probe = download.StageProbe()
    prefix = f"http://127.0.0.1:{server.port}"
    with probe.installed():
        outcome = download.run_fluxtrain(
            server=server,
            urls=[prefix + path for path in paths],
            concurrency=concurrency,
            per_host=concurrency,
            workdir=download.run_folder("fluxtrain-"),
            profile=False,
            cprofile=False,
        )
    if outcome.ok != len(paths):
        raise SystemExit(f"fluxtrain saved {outcome.ok} of {len(paths)}: {list(outcome.failed.items())[:3]}")
    fetches = {url.removeprefix(prefix): span for url, span in probe.fetch.items()}
    return outcome.wall_s, outcome.cpu_s, fetches


def _ms(values: list[float]) -> str:
    kept = [value for value in values if not math.isnan(value)]
    if len(kept) < 2:
        return "-"
    return f"{statistics.mean(kept) * 1e3:.2f} / {statistics.quantiles(kept, n=20)[18] * 1e3:.2f}"


def measure(*, n: int, concurrency: int, runs: int, clients: list[str]) -> None:
    bodies = download.make_bodies(download.DISTINCT_BODIES, SIDE, jpeg=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    served = _FORK.Value("l", 0)
    asking, answering = _FORK.Pipe()
    process = _FORK.Process(target=_serve, args=(listener, bodies, served, answering), daemon=True)
    process.start()
    server = download.ImageServer(port=listener.getsockname()[1], process=process, served=served)
    walls: dict[str, list[float]] = {name: [] for name in clients}
    cpus: dict[str, list[float]] = {name: [] for name in clients}
    server_cpus: dict[str, list[float]] = {name: [] for name in clients}
    spans: dict[str, dict[str, list[float]]] = {name: {} for name in clients}
    try:
        for run in range(runs):
            for name in clients:
                paths = [f"/{name}-{run}/{index:06d}.png" for index in range(n)]
                download.settle()
                server_before = server.cpu_seconds()
                own_before, children_before = (
                    _cpu_seconds(resource.RUSAGE_SELF),
                    _cpu_seconds(resource.RUSAGE_CHILDREN),
                )
                if name == "fluxtrain":
                    wall, cpu, times = _fluxtrain(server, paths, concurrency)
                else:
                    started = time.perf_counter()
                    times = CLIENTS[name](server.port, paths, concurrency)
                    wall = time.perf_counter() - started
                    cpu = _cpu_seconds(resource.RUSAGE_SELF) - own_before
                    cpu += _cpu_seconds(resource.RUSAGE_CHILDREN) - children_before
                server_cpus[name].append(server.cpu_seconds() - server_before)
                walls[name].append(wall)
                cpus[name].append(cpu)
                asking.send(None)
                timeline: ServerTimes = asking.recv()
                if len(timeline) != n:
                    raise SystemExit(f"{name}: the server answered {len(timeline)} of {n} requests")
                record = spans[name]
                for path, (accepted, thread, read, written) in timeline.items():
                    record.setdefault("accept -> thread", []).append(thread - accepted)
                    record.setdefault("thread -> request read", []).append(read - thread)
                    start, end = times.get(path, (math.nan, math.nan))
                    record.setdefault("client start -> accept", []).append(accepted - start)
                    record.setdefault("written -> client end", []).append(end - written)
                print(f"run {run + 1} {name:14s} {wall:.3f} s", flush=True)
    finally:
        process.terminate()
        process.join(10)
        listener.close()
    bound = n / concurrency * LATENCY
    print(
        f"\n{n} URLs, concurrency {concurrency}, {LATENCY * 1e3:.0f} ms, {SIDE} px PNG; "
        f"latency bound {bound:.2f} s; median of {runs} run(s); per request: mean / p95 ms over all runs"
    )
    names = ("client start -> accept", "accept -> thread", "thread -> request read", "written -> client end")
    print(
        f"{'client':14s} {'wall':>8s} {'x bound':>8s} {'CPU/req':>8s} {'server':>7s}  "
        + "  ".join(f"{k:>22s}" for k in names)
    )
    for name in clients:
        wall = statistics.median(walls[name])
        print(
            f"{name:14s} {wall:7.3f}s {wall / bound:7.2f}x {statistics.median(cpus[name]) / n * 1e3:6.2f}ms "
            f"{statistics.median(server_cpus[name]) / n * 1e3:5.2f}ms  "
            + "  ".join(f"{_ms(spans[name].get(k, [])):>22s}" for k in names)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="distinct image URLs (default 1000)")
    parser.add_argument("--concurrency", type=int, default=64, help="default 64")
    parser.add_argument("--runs", type=int, default=3, help="runs of every client, taking turns (default 3)")
    parser.add_argument(
        "--clients", default=",".join([*CLIENTS, "fluxtrain"]), help="comma-separated, in order"
    )
    parser.add_argument("--workdir", help="folder fluxtrain writes into (default: the system temp folder)")
    args = parser.parse_args(argv)
    clients = args.clients.split(",")
    unknown = set(clients) - {*CLIENTS, "fluxtrain"}
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    print(
        f"machine: {os.cpu_count()} cores, {download._cpu_model()}; python {sys.version.split()[0]}; "
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    with tempfile.TemporaryDirectory(prefix="client-floor-", dir=args.workdir) as root:
        download.RUNS_ROOT = Path(root)
        measure(n=args.n, concurrency=args.concurrency, runs=args.runs, clients=clients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
