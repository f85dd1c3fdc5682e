"""Per-origin keep-alive connections: reused while idle, at most `max_idle` kept, each origin apart."""

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from fluxtrain.datasets import fetch
from tests.datasets.support import LoopbackServer, Reply

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture
def keep_alive_server() -> Iterator[LoopbackServer]:
    running = LoopbackServer(keep_alive=True).start()
    yield running
    running.stop()


async def _get(client: httpx.AsyncClient, url: str) -> bytes:
    fetched = await fetch.fetch_bytes(client, url, allow=LOOPBACK, max_bytes=1 << 20, timeout=5)
    return fetched.content


def _wait_for(condition: Callable[[], bool], seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_idle_connections_over_the_cap_are_closed_and_the_rest_reused(
    keep_alive_server: LoopbackServer,
) -> None:
    slow = [keep_alive_server.add(f"/{index}", Reply(body=b"x" * 10, delay=0.2)) for index in range(6)]
    quick = keep_alive_server.add("/quick", Reply(body=b"y"))

    async def scenario() -> None:
        async with fetch.make_client(allow=LOOPBACK, concurrency=2, timeout=5) as client:
            assert await asyncio.gather(*(_get(client, url) for url in slow)) == [b"x" * 10] * 6
            assert keep_alive_server.connections == 6
            assert await asyncio.to_thread(_wait_for, lambda: keep_alive_server.connections_open == 2)
            for _ in range(4):
                assert await _get(client, quick) == b"y"
            assert keep_alive_server.connections == 6

    asyncio.run(scenario())


def test_connections_are_kept_per_origin(keep_alive_server: LoopbackServer) -> None:
    other = LoopbackServer(keep_alive=True).start()
    try:
        here = keep_alive_server.add("/a", Reply(body=b"a"))
        there = other.add("/b", Reply(body=b"b"))

        async def scenario() -> None:
            async with fetch.make_client(allow=LOOPBACK, concurrency=4, timeout=5) as client:
                for _ in range(3):
                    assert await _get(client, here) == b"a"
                    assert await _get(client, there) == b"b"

        asyncio.run(scenario())
        assert keep_alive_server.connections == 1 and other.connections == 1
    finally:
        other.stop()
