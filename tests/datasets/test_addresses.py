import ipaddress

import pytest

from fluxtrain.datasets import addresses
from fluxtrain.datasets.addresses import parse_ip, refusal_reason

LOOPBACK_ONLY = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.mark.parametrize(
    ("spelling", "meaning"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1.65535", "10.1.255.255"),
        ("0xa9.254.169.254", "169.254.169.254"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:127.0.0.1"),
        ("8.8.8.8.", "8.8.8.8"),
    ],
)
def test_loose_ip_spellings_read_as_the_resolver_does(spelling: str, meaning: str) -> None:
    assert parse_ip(spelling) == ipaddress.ip_address(meaning)


def test_a_long_spelling_is_read_the_same_but_not_kept_in_the_cache() -> None:
    """inet_aton takes any number of leading zeros; a megabyte of them must not stay in memory."""
    long_spelling = "0" * 1_000_000 + "177.0.0.1"
    before = addresses._parse_ip_cached.cache_info().currsize
    assert parse_ip(long_spelling) == ipaddress.ip_address("127.0.0.1")
    assert addresses._parse_ip_cached.cache_info().currsize == before


@pytest.mark.parametrize("host", ["example.com", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "1.2.3.999", ""])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ip(host) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "0.0.0.0",
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.9",
        "198.18.0.1",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "::10.0.0.1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",
        "64:ff9b::a00:1",
    ],
)
def test_addresses_that_are_not_global_are_refused(address: str) -> None:
    reason = refusal_reason(ipaddress.ip_address(address))
    assert reason is not None and reason.startswith("refused address")


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_global_addresses_are_allowed(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


def test_allow_networks_open_only_what_they_list() -> None:
    assert refusal_reason(ipaddress.ip_address("127.0.0.5"), LOOPBACK_ONLY) is None
    assert refusal_reason(ipaddress.ip_address("::ffff:127.0.0.5"), LOOPBACK_ONLY) is None
    assert refusal_reason(ipaddress.ip_address("10.0.0.1"), LOOPBACK_ONLY) is not None
    assert refusal_reason(ipaddress.ip_address("::1"), LOOPBACK_ONLY) is not None
