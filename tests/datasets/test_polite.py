"""Polite connections: a per-host cap under the batch's concurrency, keep-alive reuse, and one
retry after a refused or reset connection."""

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from fluxtrain.datasets import fetch
from fluxtrain.datasets.ingest import DownloadResult, download_images
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer, Reply


def run(settings: Settings, urls: list[str]) -> DownloadResult:
    return asyncio.run(download_images(settings=settings, name="set", urls=urls))


@pytest.fixture
def keep_alive_server() -> Iterator[LoopbackServer]:
    running = LoopbackServer(keep_alive=True).start()
    yield running
    running.stop()


def test_the_per_host_cap_is_never_exceeded(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    settings = open_settings.model_copy(update={"download_per_host": 3, "download_concurrency": 32})
    urls = [server.add(f"/{index}.png", Reply(body=png_bytes, delay=0.15)) for index in range(12)]
    result = run(settings, urls)
    assert result.failed == {} and len(result.files) == 12
    assert server.peak_requests == 3


def test_keep_alive_connections_are_reused_within_the_cap(
    keep_alive_server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    settings = open_settings.model_copy(update={"download_per_host": 4, "download_concurrency": 32})
    urls = [keep_alive_server.add(f"/{index}.png", Reply(body=png_bytes, delay=0.05)) for index in range(20)]
    result = run(settings, urls)
    assert result.failed == {} and len(result.files) == 20
    assert len(keep_alive_server.hits) == 20
    assert keep_alive_server.peak_requests == 4
    assert keep_alive_server.connections <= 4
    assert keep_alive_server.peak_connections <= 4


def test_a_redirect_on_the_same_host_needs_no_second_slot(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    settings = open_settings.model_copy(update={"download_per_host": 1})
    target = server.add("/img.png", Reply(body=png_bytes))
    first = server.add("/go", Reply(status=302, headers={"Location": target}))
    second = server.add("/other.png", Reply(body=png_bytes))
    result = run(settings, [first, second])
    assert result.failed == {}
    assert sorted(server.hits) == ["/go", "/img.png", "/other.png"]


def test_a_redirect_to_another_host_takes_that_hosts_slot(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    other = LoopbackServer("127.0.0.2").start()
    try:
        settings = open_settings.model_copy(update={"download_per_host": 1})
        target = other.add("/img.png", Reply(body=png_bytes, delay=0.1))
        redirect = Reply(status=302, headers={"Location": target})
        hops = [server.add(f"/go{index}", redirect) for index in range(3)]
        result = run(settings, hops)
        assert result.failed == {}
        assert other.peak_requests == 1 and len(other.hits) == 3
    finally:
        other.stop()


def test_a_reset_first_connection_still_yields_the_image(open_settings: Settings, png_bytes: bytes) -> None:
    server = LoopbackServer(reset_first=1).start()
    try:
        url = server.add("/img.png", Reply(body=png_bytes))
        result = run(open_settings, [url])
    finally:
        server.stop()
    assert result.failed == {}
    assert server.hits == ["/img.png"] and server.resets_left == 0


def test_a_connection_reset_again_fails_the_url_after_one_retry(
    open_settings: Settings, png_bytes: bytes
) -> None:
    server = LoopbackServer(reset_first=3).start()
    try:
        url = server.add("/img.png", Reply(body=png_bytes))
        result = run(open_settings, [url])
    finally:
        server.stop()
    assert set(result.failed) == {url}
    assert server.hits == [] and server.resets_left == 1


def test_a_refused_connection_is_retried_after_a_backoff_then_fails(open_settings: Settings) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"http://127.0.0.1:{port}/img.png"
    started = time.monotonic()
    result = run(open_settings, [url])
    assert result.failed[url].startswith("could not connect")
    assert time.monotonic() - started >= fetch.RETRY_BACKOFF
