"""Which IP addresses URL fetching may reach, and how loose IP spellings in URLs are read.

Only globally routable addresses are reachable, unless an operator lists a network in
FLUXTRAIN_ALLOW_NETWORKS. IPv6 forms that embed an IPv4 address (mapped, compatible, 6to4,
Teredo, NAT64) are judged by the IPv4 address inside them as well.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


# Hosts up to this long are cached; longer ones (a loose IPv4 spelling may carry any number of
# leading zeros) are read each time, so a request of huge host names cannot pin memory in the cache.
_CACHED_HOST_LENGTH = 255


def parse_ip(host: str) -> IPAddress | None:
    """Read `host` as an IP address the way a C resolver would, so no spelling slips past the check.

    Cached: a batch's URLs mostly share a few hosts, and each is read twice per URL (`check_url`).
    """
    return _parse_ip_cached(host) if len(host) <= _CACHED_HOST_LENGTH else _parse_ip(host)


@lru_cache(maxsize=4096)
def _parse_ip_cached(host: str) -> IPAddress | None:
    return _parse_ip(host)


def _parse_ip(host: str) -> IPAddress | None:
    text = host.strip().strip("[]")
    if "%" in text:
        text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    return _parse_loose_ipv4(text)


def _parse_loose_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """inet_aton's forms: 1 to 4 parts, each decimal, 0x-hex or 0-octal; the last fills the rest."""
    parts = text.rstrip(".").split(".") if text else []
    if not 1 <= len(parts) <= 4:
        return None
    numbers: list[int] = []
    for part in parts:
        value = _parse_number(part)
        if value is None:
            return None
        numbers.append(value)
    *head, last = numbers
    if any(n > 0xFF for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(value)


def _parse_number(part: str) -> int | None:
    lowered = part.lower()
    try:
        if lowered.startswith("0x"):
            return int(lowered[2:] or "0", 16)
        if len(lowered) > 1 and lowered.startswith("0"):
            return int(lowered[1:], 8)
        if lowered.isdigit():
            return int(lowered, 10)
    except ValueError:
        return None
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


@lru_cache(maxsize=4096)
def _why_not_global(address: IPAddress) -> str | None:
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in _SHARED, "shared address space"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "not globally routable"),
    )
    return next((label for failed, label in checks if failed), None)


def _allowed(address: IPAddress, allow: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in allow)


def _describe_mapped(address: ipaddress.IPv6Address) -> str:
    mapped = address.ipv4_mapped
    label = _why_not_global(mapped) if mapped is not None else None
    return f"refused address {address} (embeds {mapped}): {label or 'not globally routable'}"


def refusal_reason(address: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why `address` may not be fetched from, or None when it may."""
    if _allowed(address, allow):
        return None
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            if refusal_reason(address.ipv4_mapped, allow) is None:
                return None
            return _describe_mapped(address)
        candidates.extend(_embedded_ipv4(address))
    for candidate in candidates:
        label = _why_not_global(candidate)
        if label is not None:
            shown = f"{address}" if candidate == address else f"{address} (embeds {candidate})"
            return f"refused address {shown}: {label}"
    return None
