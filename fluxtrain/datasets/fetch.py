"""Fetching one URL's bytes safely: checked addresses only, bounded size, bounded time.

The client's network backend resolves every host itself and connects to the address it checked,
so a second DNS answer can never steer a connection elsewhere; TLS still verifies and sends SNI
for the URL's host name. Redirects are followed by hand so every hop is checked again.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import httpcore
import httpx

from fluxtrain.datasets.addresses import IPNetwork, parse_ip, refusal_reason

MAX_REDIRECTS = 5
USER_AGENT = "fluxtrain/0.1 (+dataset downloader)"


class FetchError(Exception):
    """One URL could not be fetched; the message is the short reason shown to the user."""


class AddressRefusedError(FetchError):
    """The host resolves to an address that fetching may not reach."""


@dataclass(frozen=True)
class Fetched:
    url: str
    content: bytes


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves a host, refuses it unless every address passes the policy, connects to that address."""

    def __init__(self, allow: Sequence[IPNetwork]) -> None:
        self._allow = tuple(allow)
        self._inner = httpcore.AnyIOBackend()

    async def _resolve(self, host: str, port: int) -> str:
        literal = parse_ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise FetchError(f"could not resolve host {host}") from exc
            addresses = [parse_ip(str(info[4][0])) for info in infos]
        checked = [a for a in addresses if a is not None]
        if not checked:
            raise FetchError(f"could not resolve host {host}")
        for address in checked:
            reason = refusal_reason(address, self._allow)
            if reason is not None:
                raise AddressRefusedError(reason)
        return str(checked[0])

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await self._resolve(host, port)
        return await self._inner.connect_tcp(
            address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise FetchError("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool built on the checking network backend."""

    def __init__(self, *, allow: Sequence[IPNetwork], limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        ssl_context = httpx.create_ssl_context(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_CheckedBackend(allow),
        )


def make_client(*, allow: Sequence[IPNetwork], concurrency: int, timeout: float) -> httpx.AsyncClient:
    """One client and connection pool for a whole batch, never using proxies from the environment."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(
        transport=_CheckedTransport(allow=allow, limits=limits),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"},
    )


def _canonical_host(url: str, allow: Sequence[IPNetwork]) -> str:
    """Refuse an IP-literal host in any spelling, and rewrite loose IPv4 spellings to dotted quads."""
    try:
        split = urllib.parse.urlsplit(url)
        host, port = split.hostname, split.port
    except ValueError as exc:
        raise FetchError(f"malformed URL: {exc}") from exc
    literal = parse_ip(host) if host else None
    if literal is None:
        return url
    reason = refusal_reason(literal, allow)
    if reason is not None:
        raise AddressRefusedError(reason)
    if literal.version == 6 or str(literal) == host:
        return url
    userinfo, at, _ = split.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{literal}" + (f":{port}" if port is not None else "")
    return urllib.parse.urlunsplit(split._replace(netloc=netloc))


def check_url(url: str, allow: Sequence[IPNetwork]) -> httpx.URL:
    """Parse a URL and refuse what can be refused without the network: scheme, host, IP literals."""
    text = _canonical_host(url.strip(), allow)
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise FetchError(f"malformed URL: {exc}") from exc
    if not parsed.scheme:
        raise FetchError("malformed URL: no scheme")
    if parsed.scheme not in ("http", "https"):
        raise FetchError(f"unsupported scheme '{parsed.scheme}' (only http and https)")
    if not parsed.host:
        raise FetchError("malformed URL: no host")
    literal = parse_ip(parsed.host)
    if literal is not None:
        reason = refusal_reason(literal, allow)
        if reason is not None:
            raise AddressRefusedError(reason)
    return parsed


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"too large: {int(declared)} bytes, the limit is {max_bytes}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(f"too large: over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _fetch_hops(
    client: httpx.AsyncClient, url: str, *, allow: Sequence[IPNetwork], max_bytes: int
) -> Fetched:
    request = client.build_request("GET", check_url(url, allow))
    for _ in range(MAX_REDIRECTS + 1):
        response = await client.send(request, stream=True)
        try:
            if response.is_redirect:
                if response.next_request is None:
                    raise FetchError(f"HTTP {response.status_code} redirect without a usable Location")
                next_url = response.next_request.url
                check_url(str(next_url), allow)
                request = response.next_request
                continue
            if response.status_code >= 400:
                raise FetchError(f"HTTP {response.status_code} {response.reason_phrase}".strip())
            if response.status_code != 200:
                raise FetchError(f"HTTP {response.status_code}: expected 200 with the image")
            content = await _read_capped(response, max_bytes)
            return Fetched(url=str(request.url), content=content)
        finally:
            await response.aclose()
    raise FetchError(f"too many redirects (more than {MAX_REDIRECTS})")


async def fetch_bytes(
    client: httpx.AsyncClient,
    url: str,
    *,
    allow: Sequence[IPNetwork],
    max_bytes: int,
    timeout: float,
) -> Fetched:
    """Fetch one URL within `timeout` seconds overall; any trouble becomes a FetchError with a reason."""
    try:
        async with asyncio.timeout(timeout):
            return await _fetch_hops(client, url, allow=allow, max_bytes=max_bytes)
    except TimeoutError as exc:
        raise FetchError(f"timed out after {timeout:g} s") from exc
    except httpx.TimeoutException as exc:
        raise FetchError(f"timed out after {timeout:g} s") from exc
    except httpx.RemoteProtocolError as exc:
        raise FetchError(f"truncated or broken response: {exc}") from exc
    except httpx.DecodingError as exc:
        raise FetchError(f"could not decode the response body: {exc}") from exc
    except httpx.ConnectError as exc:
        raise FetchError(f"could not connect: {exc or 'connection refused'}") from exc
    except httpx.InvalidURL as exc:
        raise FetchError(f"malformed URL: {exc}") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"request failed: {type(exc).__name__}: {exc}") from exc
