"""Fetching one URL's bytes safely: checked addresses only, bounded size, bounded time.

The client's network backend resolves every host itself and connects to the address it checked,
so a second DNS answer can never steer a connection elsewhere; TLS still verifies and sends SNI
for the URL's host name. Redirects are followed by hand so every hop is checked again.

Politeness: `HostSlots` caps the requests (hence, with HTTP/1.1 keep-alive reuse, the connections)
open to one host at once, for every hop, redirects included; a connection that is refused or reset
before any response arrives is tried once more after RETRY_BACKOFF seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import certifi
import httpcore
import httpx

from fluxtrain.datasets.addresses import IPNetwork, parse_ip, refusal_reason
from fluxtrain.datasets.connections import OriginConnections
from fluxtrain.errors import UnavailableError

MAX_REDIRECTS = 5
RETRY_BACKOFF = 0.25
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
    """Resolves a host, refuses it unless every address passes the policy, connects to those addresses."""

    def __init__(self, allow: Sequence[IPNetwork]) -> None:
        self._allow = tuple(allow)
        self._inner = httpcore.AnyIOBackend()

    async def _resolve(self, host: str, port: int) -> list[str]:
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
        checked = list(dict.fromkeys(a for a in addresses if a is not None))
        if not checked:
            raise FetchError(f"could not resolve host {host}")
        for address in checked:
            reason = refusal_reason(address, self._allow)
            if reason is not None:
                raise AddressRefusedError(reason)
        return [str(address) for address in checked]

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._resolve(host, port)
        for address in addresses[:-1]:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError:
                continue
        return await self._inner.connect_tcp(
            addresses[-1], port, timeout=timeout, local_address=local_address, socket_options=socket_options
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


_HELD_HOSTS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "fluxtrain_held_hosts", default=frozenset()
)


class HostSlots:
    """At most `per_host` requests open to one host at once, shared by every task of a batch.

    A task that already holds a host's slot (`hold`, taken before its URL's timer starts) is not
    made to wait for a second one when the transport sends to that host.
    """

    def __init__(self, per_host: int) -> None:
        self._per_host = per_host
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    async def claim(self, host: str) -> Callable[[], None] | None:
        """Wait for a slot on `host`; the release to call, or None when this task holds one already."""
        if host in _HELD_HOSTS.get():
            return None
        semaphore = self._semaphores.setdefault(host, asyncio.Semaphore(self._per_host))
        await semaphore.acquire()
        return semaphore.release

    @contextlib.asynccontextmanager
    async def hold(self, host: str) -> AsyncIterator[None]:
        """Hold a slot on `host` for this task, so its requests there take no second one."""
        release = await self.claim(host)
        token = _HELD_HOSTS.set(_HELD_HOSTS.get() | {host})
        try:
            yield
        finally:
            _HELD_HOSTS.reset(token)
            if release is not None:
                release()


# httpcore's errors and the httpx errors callers catch, most specific first.
_ERROR_MAP: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """Re-raise httpcore's errors as the httpx errors a client caller expects; others pass through."""
    try:
        yield
    except httpcore.ProxyError as exc:
        raise httpx.ProxyError(str(exc)) from exc
    except Exception as exc:
        mapped = next((to for source, to in _ERROR_MAP if isinstance(exc, source)), None)
        if mapped is None:
            raise
        raise mapped(str(exc)) from exc


class _BodyStream(httpx.AsyncByteStream):
    """A response body read from httpcore, its errors turned into httpx errors."""

    def __init__(
        self, stream: AsyncIterable[bytes], on_close: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._stream = stream
        self._on_close = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for chunk in self._stream:
                yield chunk

    async def aclose(self) -> None:
        try:
            close = getattr(self._stream, "aclose", None)
            if close is not None:
                with _httpx_errors():
                    await close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                await on_close()


class _CheckedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over per-origin httpcore connections whose network backend checks every address.

    Built on httpcore's public connection class (`connections.OriginConnections` keeps them);
    proxies, HTTP/2 and unix sockets are deliberately not offered.
    """

    def __init__(
        self,
        *,
        allow: Sequence[IPNetwork],
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext,
        host_slots: HostSlots | None = None,
    ) -> None:
        self._host_slots = host_slots
        self._connections = OriginConnections(
            ssl_context=ssl_context,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_CheckedBackend(allow),
            max_idle=limits.max_keepalive_connections or 0,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        origin = core_request.url.origin
        release = None
        if self._host_slots is not None:
            release = await self._host_slots.claim(request.url.host)
        connection: httpcore.AsyncHTTPConnection | None = None
        try:
            connection = await self._connections.take(origin)
            with _httpx_errors():
                core_response = await connection.handle_async_request(core_request)
        except BaseException:
            if connection is not None:
                await self._connections.give_back(connection, origin)
            if release is not None:
                release()
            raise
        assert isinstance(core_response.stream, AsyncIterable)
        taken = connection

        async def on_close() -> None:
            try:
                await self._connections.give_back(taken, origin)
            finally:
                if release is not None:
                    release()

        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_BodyStream(core_response.stream, on_close=on_close),
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        with _httpx_errors():
            await self._connections.aclose()


def make_ssl_context(ca_bundle: Path | None = None) -> ssl.SSLContext:
    """certifi's roots, plus the PEM certificates of `ca_bundle` (FLUXTRAIN_CA_BUNDLE) when set."""
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=str(ca_bundle))
        except (OSError, ssl.SSLError) as exc:
            raise UnavailableError(f"FLUXTRAIN_CA_BUNDLE {ca_bundle} could not be loaded: {exc}") from exc
    return context


def make_client(
    *,
    allow: Sequence[IPNetwork],
    concurrency: int,
    timeout: float,
    ca_bundle: Path | None = None,
    host_slots: HostSlots | None = None,
) -> httpx.AsyncClient:
    """One client and keep-alive pool for a whole batch, never using proxies from the environment."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport = _CheckedTransport(
        allow=allow, limits=limits, ssl_context=make_ssl_context(ca_bundle), host_slots=host_slots
    )
    return httpx.AsyncClient(
        transport=transport,
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


_RETRIED_ERRORS = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """Send, once more after RETRY_BACKOFF when the connection was refused or reset before a response."""
    try:
        return await client.send(request, stream=True)
    except _RETRIED_ERRORS as exc:
        if _certificate_error(exc) is not None:
            raise
    await asyncio.sleep(RETRY_BACKOFF)
    return await client.send(request, stream=True)


async def _fetch_hops(
    client: httpx.AsyncClient, url: str, *, allow: Sequence[IPNetwork], max_bytes: int
) -> Fetched:
    request = client.build_request("GET", check_url(url, allow))
    for _ in range(MAX_REDIRECTS + 1):
        response = await _send(client, request)
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


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a connection error, if that is what it was."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


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
        refused = _certificate_error(exc)
        if refused is not None:
            raise FetchError(f"TLS certificate rejected: {refused.verify_message or refused.reason}") from exc
        raise FetchError(f"could not connect: {exc or 'connection refused'}") from exc
    except httpx.InvalidURL as exc:
        raise FetchError(f"malformed URL: {exc}") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"request failed: {type(exc).__name__}: {exc}") from exc
