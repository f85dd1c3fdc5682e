"""Keep-alive HTTP/1.1 connections kept per origin, taken and given back in constant time.

httpcore's AsyncConnectionPool walks every pooled connection for every queued request, each
step an `is_idle` / `has_expired` check (a `getpeername` and a `poll` system call), and counts
idle connections inside that walk, so its cost grows with connections x requests: at
concurrency 64 it took 13.5 s of a 19 s batch on the event loop, and more concurrency made the
batch slower. Here a request takes the most recently given back idle connection of its origin
(one liveness check), or opens a new one through the same network backend, so the address
checks stay where they are. How many connections are in use at once is the callers' bound
(HostSlots per host, the batch's concurrency); at most `max_idle` idle ones are kept, the least
recently used closed first.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict

import httpcore

OriginKey = tuple[bytes, bytes, int | None]


def origin_key(origin: httpcore.Origin) -> OriginKey:
    return (origin.scheme, origin.host, origin.port)


class OriginConnections:
    """Idle connections by origin plus one least-recently-used order over all of them."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        keepalive_expiry: float | None,
        network_backend: httpcore.AsyncNetworkBackend,
        max_idle: int,
    ) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._backend = network_backend
        self._max_idle = max_idle
        self._idle: dict[OriginKey, list[httpcore.AsyncHTTPConnection]] = {}
        self._lru: OrderedDict[httpcore.AsyncHTTPConnection, OriginKey] = OrderedDict()
        self._in_use: set[httpcore.AsyncHTTPConnection] = set()

    async def take(self, origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        """A live idle connection to `origin`, or a new one that connects on its first request."""
        key = origin_key(origin)
        idle = self._idle.get(key, [])
        while idle:
            connection = idle.pop()
            del self._lru[connection]
            if not idle:
                del self._idle[key]
            if connection.is_available() and not connection.has_expired():
                self._in_use.add(connection)
                return connection
            await connection.aclose()
        connection = httpcore.AsyncHTTPConnection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            network_backend=self._backend,
        )
        self._in_use.add(connection)
        return connection

    async def give_back(self, connection: httpcore.AsyncHTTPConnection, origin: httpcore.Origin) -> None:
        """Keep a connection its response left idle; close any other, and the oldest idle one over the cap."""
        self._in_use.discard(connection)
        if not connection.is_available():
            await connection.aclose()
            return
        key = origin_key(origin)
        self._idle.setdefault(key, []).append(connection)
        self._lru[connection] = key
        if len(self._lru) > self._max_idle:
            oldest, oldest_key = self._lru.popitem(last=False)
            same_origin = self._idle[oldest_key]
            same_origin.remove(oldest)
            if not same_origin:
                del self._idle[oldest_key]
            await oldest.aclose()

    async def aclose(self) -> None:
        """Close every connection, idle or still in use."""
        connections = [*self._lru, *self._in_use]
        self._idle.clear()
        self._lru.clear()
        self._in_use.clear()
        for connection in connections:
            await connection.aclose()
