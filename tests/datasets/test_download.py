import asyncio
import hashlib
import ipaddress
import json
import logging
import time
from pathlib import Path

import pytest
from PIL import Image

from fluxtrain.datasets import commits, ledger
from fluxtrain.datasets.ingest import DownloadResult, download_images
from fluxtrain.errors import InvalidInputError
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer, Reply, assert_baseline_jpeg, assert_clean_folder, encode


def run(settings: Settings, urls: list[str], name: str = "set") -> DownloadResult:
    calls: list[tuple[str, str | None, str | None]] = []
    result = asyncio.run(
        download_images(settings=settings, name=name, urls=urls, on_result=lambda *a: calls.append(a))
    )
    assert sorted(call[0] for call in calls) == sorted(set(urls))
    assert set(result.files) | set(result.failed) == set(urls)
    assert not set(result.files) & set(result.failed)
    assert_clean_folder(settings.datasets_dir / name)
    return result


def manifest_of(settings: Settings, name: str = "set") -> dict:
    return json.loads((settings.datasets_dir / name / "manifest.json").read_text())


def test_formats_land_as_jpegs_with_a_manifest(server: LoopbackServer, open_settings: Settings) -> None:
    picture = Image.new("RGBA", (48, 32), (10, 120, 200, 255))
    bodies = {
        server.add("/a/photo.png", Reply(body=encode(picture, "PNG"))): "photo.jpg",
        server.add("/b/cdn-object", Reply(body=encode(picture.convert("RGB"), "WEBP"))): "cdn-object.jpg",
        server.add("/c/anim.gif", Reply(body=encode(picture.convert("RGB"), "GIF"))) + "?w=1": "anim.jpg",
        server.add("/d/pic.avif", Reply(body=encode(picture.convert("RGB"), "AVIF"))): "pic.jpg",
        server.add(
            "/e/lie.html",
            Reply(body=encode(picture.convert("RGB"), "BMP"), headers={"Content-Type": "text/html"}),
        ): "lie.jpg",
    }
    result = run(open_settings, list(bodies))
    assert result.failed == {}
    folder = open_settings.datasets_dir / "set"
    assert {url: Path(path).name for url, path in result.files.items()} == bodies
    manifest = manifest_of(open_settings)
    assert set(manifest) == set(bodies.values())
    for url, path in result.files.items():
        assert Path(path).parent == folder and Path(path).is_absolute()
        assert assert_baseline_jpeg(Path(path)) == (48, 32)
        source = server.routes[url.split(str(server.port), 1)[1].split("?")[0]].body
        assert manifest[Path(path).name] == {
            "url": url,
            "sha256": hashlib.sha256(source).hexdigest(),
            "bytes": len(source),
            "width": 48,
            "height": 32,
            "stored": "reencoded",
        }


def test_same_url_keeps_one_file_and_same_base_name_gets_two(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    first = server.add("/one/cat.png", Reply(body=png_bytes))
    second = server.add("/two/cat.png", Reply(body=png_bytes))
    result = run(open_settings, [first, first, second])
    assert sorted(Path(p).name for p in result.files.values()) == ["cat-2.jpg", "cat.jpg"]
    again = run(open_settings, [second, first])
    assert again.files == result.files
    assert sorted(p.name for p in (open_settings.datasets_dir / "set").iterdir()) == [
        "cat-2.jpg",
        "cat.jpg",
        "manifest.json",
    ]
    assert {entry["url"] for entry in manifest_of(open_settings).values()} == {first, second}


def test_refetch_records_a_file_a_crash_left_without_manifest_entry(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    kept = server.add("/kept/cat.png", Reply(body=png_bytes))
    lost = server.add("/lost/cat.png", Reply(body=encode(Image.new("RGB", (64, 48), (0, 90, 200)), "PNG")))
    first = run(open_settings, [kept, lost])
    folder = open_settings.datasets_dir / "set"
    lost_name = Path(first.files[lost]).name
    manifest = manifest_of(open_settings)
    del manifest[lost_name]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    again = run(open_settings, [lost])
    assert again.files == {lost: first.files[lost]}
    assert sorted(p.name for p in folder.iterdir()) == ["cat-2.jpg", "cat.jpg", "manifest.json"]
    assert manifest_of(open_settings)[lost_name]["url"] == lost


def test_unrecorded_file_with_other_content_is_left_alone(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    folder = open_settings.datasets_dir / "set"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "JPEG"))
    url = server.add("/x/cat.png", Reply(body=png_bytes))
    assert Path(run(open_settings, [url]).files[url]).name == "cat-2.jpg"
    assert set(manifest_of(open_settings)) == {"cat-2.jpg"}


def test_concurrent_batches_into_one_dataset_keep_every_manifest_entry(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    batches = [
        [server.add(f"/b{b}/{i}/img.png", Reply(body=png_bytes, delay=0.05)) for i in range(2)]
        for b in range(6)
    ]

    async def both() -> list[DownloadResult]:
        return await asyncio.gather(
            *(download_images(settings=open_settings, name="set", urls=urls) for urls in batches)
        )

    results = asyncio.run(both())
    paths = [path for result in results for path in result.files.values()]
    assert len(set(paths)) == 12
    assert len(manifest_of(open_settings)) == 12


@pytest.fixture
def closed_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"download_timeout": 2.0})


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
        "[::1]",
    ],
)
def test_loopback_in_any_spelling_is_refused_without_contact(
    server: LoopbackServer, closed_settings: Settings, png_bytes: bytes, host: str
) -> None:
    url = server.add("/secret.png", Reply(body=png_bytes)).replace("127.0.0.1", host)
    result = run(closed_settings, [url])
    assert result.failed[url].startswith("refused address"), result.failed[url]
    assert server.hits == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "malformed URL"),
        ("http://", "malformed URL"),
        ("//example.com/x.png", "malformed URL"),
        ("ftp://example.com/x.png", "unsupported scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported scheme 'file'"),
        ("http://10.0.0.8/x.png", "refused address 10.0.0.8: private"),
        ("http://169.254.169.254/latest/meta-data", "refused address 169.254.169.254: link-local"),
        ("http://100.64.1.1/x.png", "refused address 100.64.1.1: shared address space"),
        ("http://0.0.0.0:1/x.png", "refused address 0.0.0.0"),
        ("http://[::]/x.png", "refused address ::"),
        ("http://[2002:7f00:1::]/x.png", "refused address 2002:7f00:1::"),
        ("http://224.0.0.1/x.png", "refused address 224.0.0.1: multicast"),
        ("http://192.0.2.1/x.png", "refused address 192.0.2.1"),
    ],
)
def test_bad_urls_fail_alone(closed_settings: Settings, url: str, reason: str) -> None:
    result = run(closed_settings, [url])
    assert result.failed[url].startswith(reason), result.failed[url]


def test_http_errors_go_to_failed(server: LoopbackServer, open_settings: Settings, png_bytes: bytes) -> None:
    good = server.add("/good.png", Reply(body=png_bytes))
    missing = server.url("/missing.png")
    broken = server.add("/boom.png", Reply(status=500, body=b"oops"))
    no_content = server.add("/empty.png", Reply(status=204))
    result = run(open_settings, [good, missing, broken, no_content])
    assert list(result.files) == [good]
    assert result.failed[missing] == "HTTP 404 Not Found"
    assert result.failed[broken] == "HTTP 500 Internal Server Error"
    assert result.failed[no_content].startswith("HTTP 204")


def test_a_trickling_server_times_out(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    settings = open_settings.model_copy(update={"download_timeout": 0.6})
    slow = server.add("/trickle.png", Reply(body=png_bytes, trickle=0.05))
    late = server.add("/late.png", Reply(body=png_bytes, delay=1.5))
    result = run(settings, [slow, late])
    assert result.failed == {slow: "timed out after 0.6 s", late: "timed out after 0.6 s"}


def test_size_limit_is_enforced_declared_or_streamed(server: LoopbackServer, open_settings: Settings) -> None:
    settings = open_settings.model_copy(update={"max_download_bytes": 1000})
    big = bytes(5000)
    declared = server.add("/declared.png", Reply(body=big))
    streamed = server.add("/streamed.png", Reply(body=big, content_length=-1))
    result = run(settings, [declared, streamed])
    assert result.failed[declared] == "too large: 5000 bytes, the limit is 1000"
    assert result.failed[streamed] == "too large: over the limit of 1000 bytes"


def test_undecodable_bodies_are_refused(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    html = server.add(
        "/page.jpg", Reply(body=b"<html><body>hi</body></html>", headers={"Content-Type": "image/jpeg"})
    )
    svg = server.add("/logo.svg", Reply(body=b"<svg xmlns='http://www.w3.org/2000/svg'/>"))
    cut = server.add("/cut.png", Reply(body=png_bytes[:-30], content_length=len(png_bytes)))
    half = encode(Image.effect_noise((64, 64), 40).convert("RGB"), "PNG")
    short = server.add("/short.png", Reply(body=half[: len(half) // 2]))
    result = run(open_settings, [html, svg, cut, short])
    assert result.failed[html].startswith("not an image")
    assert result.failed[svg].startswith("not an image")
    assert result.failed[cut].startswith("truncated or broken response")
    assert result.failed[short].startswith("truncated or corrupt image")


def test_decompression_bomb_is_refused(server: LoopbackServer, open_settings: Settings) -> None:
    settings = open_settings.model_copy(update={"max_image_pixels": 1000})
    bomb = server.add("/bomb.png", Reply(body=encode(Image.new("L", (100, 100)), "PNG")))
    assert run(settings, [bomb]).failed[bomb].startswith("decompression bomb")


def test_redirects_are_followed_up_to_five(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    server.add("/r/target.png", Reply(body=png_bytes))
    for hop in range(6):
        nxt = "/r/target.png" if hop == 0 else f"/r/{hop - 1}"
        server.add(f"/r/{hop}", Reply(status=302, headers={"Location": nxt}))
    five, six = server.url("/r/4"), server.url("/r/5")
    result = run(open_settings, [five, six])
    assert Path(result.files[five]).name == "4.jpg"
    assert result.failed[six] == "too many redirects (more than 5)"


def test_redirect_to_a_refused_address_is_not_followed(settings: Settings, png_bytes: bytes) -> None:
    inner = LoopbackServer(host="127.0.0.2").start()
    outer = LoopbackServer().start()
    try:
        inner.add("/secret.png", Reply(body=png_bytes))
        only_outer = settings.model_copy(update={"allow_networks": [ipaddress.ip_network("127.0.0.1/32")]})
        hop = outer.add("/go", Reply(status=301, headers={"Location": inner.url("/secret.png")}))
        ftp = outer.add("/ftp", Reply(status=302, headers={"Location": "ftp://example.com/x.png"}))
        result = run(only_outer, [hop, ftp])
        assert result.failed[hop] == "refused address 127.0.0.2: loopback"
        assert result.failed[ftp].startswith("unsupported scheme 'ftp'")
        assert inner.hits == []
        assert sorted(outer.hits) == ["/ftp", "/go"]
    finally:
        inner.stop()
        outer.stop()


def test_request_level_limits_raise(open_settings: Settings) -> None:
    with pytest.raises(InvalidInputError, match="must not be empty"):
        asyncio.run(download_images(settings=open_settings, name="set", urls=[]))
    few = open_settings.model_copy(update={"max_urls": 2})
    with pytest.raises(InvalidInputError, match="at most 2 URLs"):
        asyncio.run(
            download_images(settings=few, name="set", urls=["http://a/1", "http://a/2", "http://a/3"])
        )
    with pytest.raises(InvalidInputError):
        asyncio.run(download_images(settings=open_settings, name="../up", urls=["http://a/1"]))


@pytest.mark.parametrize("last", ["saved", "failed"])
def test_the_last_image_does_not_wait_out_the_commit_window(
    server: LoopbackServer,
    open_settings: Settings,
    png_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    last: str,
) -> None:
    """Commits are batched over a window; the batch's last image (or last failure) ends it at once."""
    monkeypatch.setattr(commits, "BATCH_WINDOW", 30.0)
    urls = [server.add(f"/quick-{index}.png", Reply(body=png_bytes)) for index in range(3)]
    urls.append(server.add("/last.png", Reply(body=png_bytes if last == "saved" else b"nope", delay=0.3)))
    started = time.monotonic()
    result = run(open_settings, urls)
    assert time.monotonic() - started < 10
    assert len(result.files) == (4 if last == "saved" else 3)


def test_a_cancelled_download_reports_nothing_after_it_ends_and_leaves_no_temporary_file(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that goes away cancels the download: what was committed is in the manifest, the
    images waiting for a worker or for the batching window leave no file behind, and no result is
    reported once the call has ended."""
    monkeypatch.setattr(commits, "BATCH_WINDOW", 1.0)
    noise = encode(Image.effect_noise((1200, 1200), 60).convert("RGB"), "PNG")
    urls = [server.add(f"/quick-{index}.png", Reply(body=png_bytes)) for index in range(3)]
    urls += [server.add(f"/big-{index}.png", Reply(body=noise)) for index in range(4)]
    urls.append(server.add("/slow.png", Reply(body=png_bytes, delay=5.0)))
    calls: list[str] = []

    async def cancel_midway() -> int:
        def note(url: str, _path: str | None, _reason: str | None) -> None:
            calls.append(url)

        download = download_images(settings=open_settings, name="set", urls=urls, on_result=note)
        task = asyncio.ensure_future(download)
        await asyncio.sleep(0.4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        reported = len(calls)
        await asyncio.sleep(2.0)
        assert len(calls) == reported
        return reported

    asyncio.run(cancel_midway())
    folder = open_settings.datasets_dir / "set"
    assert_clean_folder(folder)
    assert set(manifest_of(open_settings)) == {path.name for path in folder.glob("*.jpg")}


def test_an_unexpected_commit_error_is_logged_with_its_traceback(
    server: LoopbackServer,
    open_settings: Settings,
    png_bytes: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: object, item: object) -> None:
        raise ValueError("a bug deep in naming")

    monkeypatch.setattr(ledger.Ledger, "_commit_locked", broken)
    url = server.add("/a.png", Reply(body=png_bytes))
    with caplog.at_level(logging.ERROR):
        result = run(open_settings, [url])
    assert result.failed == {url: "unexpected error: ValueError"}
    [record] = [record for record in caplog.records if "unexpected error" in record.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_a_looping_symlink_under_an_images_name_is_passed_over(
    server: LoopbackServer, open_settings: Settings, png_bytes: bytes
) -> None:
    folder = open_settings.datasets_dir / "set"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").symlink_to("cat.jpg")
    url = server.add("/cat.png", Reply(body=png_bytes))
    result = asyncio.run(download_images(settings=open_settings, name="set", urls=[url]))
    assert result.files == {url: str(folder / "cat-2.jpg")}
    assert (folder / "cat.jpg").is_symlink()
