"""HTTPS through the checked, address-pinned connection: a real TLS server on 127.0.0.1 named localhost."""

import asyncio
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from fluxtrain.datasets.ingest import DownloadResult, download_images
from fluxtrain.errors import UnavailableError
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer, Reply, assert_baseline_jpeg


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _tls_server(ca: trustme.CA, *names: str, sni_seen: list[str | None] | None = None) -> LoopbackServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    if sni_seen is not None:
        context.sni_callback = lambda _socket, name, _context: sni_seen.append(name)
    return LoopbackServer(tls=context, url_host="localhost").start()


@pytest.fixture
def sni_seen() -> list[str | None]:
    return []


@pytest.fixture
def localhost_server(ca: trustme.CA, sni_seen: list[str | None]) -> Iterator[LoopbackServer]:
    server = _tls_server(ca, "localhost", sni_seen=sni_seen)
    yield server
    server.stop()


@pytest.fixture
def ca_settings(settings: Settings, ca: trustme.CA, tmp_path: Path) -> Settings:
    bundle = tmp_path / "extra-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return settings.model_copy(
        update={
            "allow_networks": [ipaddress.ip_network("127.0.0.0/8")],
            "download_timeout": 3.0,
            "ca_bundle": bundle,
        }
    )


def fetch(settings: Settings, url: str) -> DownloadResult:
    return asyncio.run(download_images(settings=settings, name="tls", urls=[url]))


def test_https_to_localhost_downloads_with_the_extra_ca(
    localhost_server: LoopbackServer, ca_settings: Settings, png_bytes: bytes, sni_seen: list[str | None]
) -> None:
    url = localhost_server.add("/img.png", Reply(body=png_bytes))
    assert url.startswith("https://localhost:")
    result = fetch(ca_settings, url)
    assert result.failed == {}
    assert assert_baseline_jpeg(Path(result.files[url])) == (64, 48)
    assert localhost_server.hits == ["/img.png"]
    assert sni_seen == ["localhost"]


def test_a_certificate_for_another_name_is_rejected(
    ca: trustme.CA, ca_settings: Settings, png_bytes: bytes
) -> None:
    server = _tls_server(ca, "example.test")
    try:
        url = server.add("/img.png", Reply(body=png_bytes))
        reason = fetch(ca_settings, url).failed[url]
    finally:
        server.stop()
    assert reason.startswith("TLS certificate rejected: Hostname mismatch"), reason
    assert "localhost" in reason
    assert server.hits == []


def test_without_the_ca_bundle_the_server_is_untrusted(
    localhost_server: LoopbackServer, ca_settings: Settings, png_bytes: bytes
) -> None:
    url = localhost_server.add("/img.png", Reply(body=png_bytes))
    reason = fetch(ca_settings.model_copy(update={"ca_bundle": None}), url).failed[url]
    assert reason.startswith("TLS certificate rejected: unable to get local issuer certificate"), reason
    assert localhost_server.hits == []


def test_an_unreadable_ca_bundle_is_a_clear_error(ca_settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    with pytest.raises(UnavailableError, match="FLUXTRAIN_CA_BUNDLE .*broken.pem could not be loaded"):
        fetch(ca_settings.model_copy(update={"ca_bundle": broken}), "https://localhost:1/x.png")


def test_a_ca_bundle_rewritten_in_place_is_read_again(
    localhost_server: LoopbackServer, ca_settings: Settings, ca: trustme.CA, png_bytes: bytes, tmp_path: Path
) -> None:
    """The TLS context is built once per content of the bundle file, not once for good."""
    bundle = tmp_path / "rotating.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    settings = ca_settings.model_copy(update={"ca_bundle": bundle})
    url = localhost_server.add("/img.png", Reply(body=png_bytes))
    assert fetch(settings, url).failed[url].startswith("TLS certificate rejected")
    ca.cert_pem.write_to_path(str(bundle))
    assert fetch(settings, url).failed == {}
