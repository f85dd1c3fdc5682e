"""Dataset endpoints over HTTP: the seed's download contract, uploads and zips, listing, the API key."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from fluxtrain.api.app import create_app
from fluxtrain.settings import Settings
from tests.datasets import support


@pytest.fixture
def open_client(open_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(open_settings)) as test_client:
        yield test_client


def png(color: tuple[int, int, int] = (0, 200, 0), size: tuple[int, int] = (40, 30)) -> bytes:
    return support.encode(Image.new("RGB", size, color), "PNG")


def test_download_answers_with_the_seed_shape_and_a_failed_map(
    open_client: TestClient, open_settings: Settings, server: support.LoopbackServer
) -> None:
    good = server.add("/img/image1.png", support.Reply(body=png()))
    missing = server.url("/img/none.png")
    response = open_client.post(
        "/download-images", json={"urls": [good, missing, good], "output_name": "my_dataset"}
    )
    assert response.status_code == 200
    folder = open_settings.datasets_dir / "my_dataset"
    assert response.json() == {
        "message": "Download complete",
        "files": {good: str(folder / "image1.jpg")},
        "failed": {missing: "HTTP 404 Not Found"},
    }
    support.assert_clean_folder(folder)
    detail = open_client.get("/datasets/my_dataset").json()
    assert detail["name"] == "my_dataset"
    assert [image["file"] for image in detail["images"]] == ["image1.jpg"]
    assert detail["images"][0]["caption"] is None
    assert detail["images"][0]["manifest"]["url"] == good
    assert detail["images"][0]["manifest"]["width"] == 40


@pytest.mark.parametrize(
    "name", ["", "..", ".hidden", "a/b", "a\\b", "x" * 101, "bad name", "naïve", "../../etc", "a:b"]
)
def test_bad_output_names_answer_422(client: TestClient, settings: Settings, name: str) -> None:
    response = client.post(
        "/download-images", json={"urls": ["http://example.com/a.png"], "output_name": name}
    )
    assert response.status_code == 422
    assert not settings.datasets_dir.exists() or list(settings.datasets_dir.iterdir()) == []


def test_empty_or_too_many_urls_answer_422(settings: Settings) -> None:
    settings.max_urls = 3
    with TestClient(create_app(settings)) as client:
        empty = client.post("/download-images", json={"urls": [], "output_name": "d"})
        assert empty.status_code == 422
        many = client.post(
            "/download-images", json={"urls": [f"http://a/{i}" for i in range(4)], "output_name": "d"}
        )
        assert many.status_code == 422
        assert "at most 3 URLs" in many.json()["detail"]


def test_refused_addresses_fail_per_url_without_contact(
    client: TestClient, server: support.LoopbackServer
) -> None:
    url = server.add("/x.png", support.Reply(body=png()))
    response = client.post("/download-images", json={"urls": [url, "gopher://x/y"], "output_name": "d"})
    assert response.status_code == 200
    failed = response.json()["failed"]
    assert failed[url].startswith("refused address 127.0.0.1")
    assert failed["gopher://x/y"].startswith("unsupported scheme")
    assert server.hits == []


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_upload_files_and_a_zip(client: TestClient, settings: Settings) -> None:
    archive = zip_bytes(
        {
            "photos/one.png": png((255, 0, 0)),
            "photos/two.webp": support.encode(Image.new("RGB", (8, 8)), "WEBP"),
            "../../escape.png": png(),
            "/abs/root.png": png(),
            "photos/": b"",
            "__MACOSX/._one.png": b"junk",
            "notes.txt": b"hello",
        }
    )
    files = [
        ("files", ("cat.png", png((0, 0, 255)), "image/png")),
        ("files", ("set.zip", archive, "application/zip")),
        ("files", ("page.html", b"<html></html>", "text/html")),
    ]
    response = client.post("/datasets/up/images", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    folder = settings.datasets_dir / "up"
    assert body["files"] == {
        "cat.png": str(folder / "cat.jpg"),
        "set.zip/photos/one.png": str(folder / "one.jpg"),
        "set.zip/photos/two.webp": str(folder / "two.jpg"),
    }
    assert body["failed"]["set.zip/../../escape.png"] == "refused: unsafe path in archive"
    assert body["failed"]["set.zip//abs/root.png"] == "refused: unsafe path in archive"
    assert body["failed"]["set.zip/notes.txt"].startswith("not an image")
    assert body["failed"]["page.html"].startswith("not an image")
    support.assert_clean_folder(folder)
    assert (
        not (settings.data_root / "escape.jpg").exists()
        and not (settings.datasets_dir / "escape.jpg").exists()
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["cat.jpg"]["url"] is None and manifest["cat.jpg"]["upload"] == "cat.png"
    cat = (folder / "cat.jpg").read_bytes()
    same = client.post("/datasets/up/images", files=[("files", ("cat.png", png((0, 0, 255)), "image/png"))])
    assert same.json()["files"] == {"cat.png": str(folder / "cat.jpg")}
    other = client.post("/datasets/up/images", files=[("files", ("cat.png", png((9, 9, 9)), "image/png"))])
    assert other.json()["files"] == {"cat.png": str(folder / "cat-2.jpg")}
    assert (folder / "cat.jpg").read_bytes() == cat
    assert client.get("/datasets").json() == {"datasets": [{"name": "up", "images": 4, "captions": 0}]}


def test_one_request_with_repeated_names_reports_every_part(client: TestClient, settings: Settings) -> None:
    files = [
        ("files", ("IMG_0001.png", png((255, 0, 0)), "image/png")),
        ("files", ("IMG_0001.png", png((0, 255, 0)), "image/png")),
        ("files", ("set.zip", zip_bytes({"IMG_0001.png": png((0, 0, 255))}), "application/zip")),
        ("files", ("set.zip", zip_bytes({"IMG_0001.png": b"junk"}), "application/zip")),
    ]
    response = client.post("/datasets/rep/images", files=files)
    assert response.status_code == 200, response.text
    folder = settings.datasets_dir / "rep"
    assert response.json() == {
        "message": "Upload complete",
        "files": {
            "IMG_0001.png": str(folder / "IMG_0001.jpg"),
            "IMG_0001.png#2": str(folder / "IMG_0001-2.jpg"),
            "set.zip/IMG_0001.png": str(folder / "IMG_0001-3.jpg"),
        },
        "failed": {"set.zip/IMG_0001.png#2": "not an image: could not be decoded as an accepted format"},
    }
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {name: entry["upload"] for name, entry in manifest.items()} == {
        "IMG_0001.jpg": "IMG_0001.png",
        "IMG_0001-2.jpg": "IMG_0001.png",
        "IMG_0001-3.jpg": "set.zip/IMG_0001.png",
    }


def test_zip_bomb_entries_are_refused_unread(settings: Settings) -> None:
    settings.max_download_bytes = 100_000
    bomb = zip_bytes({"bomb.png": bytes(50_000_000), "ok.png": png()})
    assert len(bomb) < 100_000
    with TestClient(create_app(settings)) as client:
        response = client.post("/datasets/z/images", files=[("files", ("b.zip", bomb, "application/zip"))])
    assert response.status_code == 200
    body = response.json()
    assert body["failed"] == {"b.zip/bomb.png": "too large: 50000000 bytes uncompressed, the limit is 100000"}
    assert list(body["files"]) == ["b.zip/ok.png"]


def test_upload_over_the_total_limit_answers_413(settings: Settings) -> None:
    settings.max_upload_bytes = 1000
    with TestClient(create_app(settings)) as client:
        response = client.post("/datasets/z/images", files=[("files", ("a.png", bytes(5000), "image/png"))])
    assert response.status_code == 413


def test_listing_detail_delete_and_404(client: TestClient, settings: Settings) -> None:
    client.post("/datasets/d1/images", files=[("files", ("a.png", png(), "image/png"))])
    (settings.datasets_dir / "d1" / "a.txt").write_text("a caption")
    assert client.get("/datasets").json() == {"datasets": [{"name": "d1", "images": 1, "captions": 1}]}
    assert client.get("/datasets/d1").json()["images"][0]["caption"] == "a caption"
    assert client.get("/datasets/nope").status_code == 404
    assert client.delete("/datasets/nope").status_code == 404
    assert client.get("/datasets/..%2F..").status_code in (404, 422)
    assert client.delete("/datasets/d1").json() == {"message": "Dataset deleted", "name": "d1"}
    assert client.get("/datasets/d1").status_code == 404


def test_a_caption_file_that_is_not_utf8_is_named_and_the_rest_is_shown(
    client: TestClient, settings: Settings
) -> None:
    parts = [("files", ("a.png", png((200, 0, 0)), "image/png")), ("files", ("b.png", png(), "image/png"))]
    client.post("/datasets/d1/images", files=parts)
    (settings.datasets_dir / "d1" / "a.txt").write_bytes(b"photo \xff\xfe bad")
    (settings.datasets_dir / "d1" / "b.txt").write_text("a caption")
    images = {image["file"]: image for image in client.get("/datasets/d1").json()["images"]}
    assert images["a.jpg"]["caption"] is None
    assert images["a.jpg"]["caption_error"] == "caption a.txt is not UTF-8 text (byte 0xff at 6)"
    assert images["b.jpg"]["caption"] == "a caption" and images["b.jpg"]["caption_error"] is None
    assert client.put("/datasets/d1/captions/a.jpg", json={"caption": "fixed"}).status_code == 200
    fixed = client.get("/datasets/d1").json()["images"][0]
    assert fixed["caption"] == "fixed" and fixed["caption_error"] is None


def test_folders_no_request_could_name_are_left_out_of_the_listing(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    client.post("/datasets/d1/images", files=[("files", ("a.png", png(), "image/png"))])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for odd in ("my set", "caf\u00e9", "weird.toml"):
        (settings.datasets_dir / odd).mkdir()
    (settings.datasets_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    assert client.get("/datasets").json() == {"datasets": [{"name": "d1", "images": 1, "captions": 0}]}


def test_delete_refuses_when_the_config_name_is_a_folder_and_changes_nothing(
    client: TestClient, settings: Settings
) -> None:
    client.post("/datasets/d1/images", files=[("files", ("a.png", png(), "image/png"))])
    (settings.datasets_dir / "d1.toml").mkdir()
    response = client.delete("/datasets/d1")
    assert response.status_code == 409
    assert response.json()["detail"] == "d1.toml is a folder, not the dataset's config: move it away first"
    assert sorted(p.name for p in settings.datasets_dir.iterdir()) == ["d1", "d1.toml"]
    assert client.get("/datasets/d1").json()["images"][0]["file"] == "a.jpg"


ROUTES = [
    ("POST", "/download-images", {"json": {"urls": ["ftp://x/y"], "output_name": "k"}}),
    ("POST", "/datasets/k/images", {"files": [("files", ("a.png", b"not an image", "image/png"))]}),
    ("GET", "/datasets", {}),
    ("GET", "/datasets/k", {}),
    ("DELETE", "/datasets/k", {}),
]


def test_api_key_guards_every_dataset_route(settings: Settings) -> None:
    settings.api_key = SecretStr("s3cret-key")
    (settings.datasets_dir / "k").mkdir(parents=True)
    with TestClient(create_app(settings)) as client:
        for method, path, kwargs in ROUTES:
            assert client.request(method, path, **kwargs).status_code == 401, path
            wrong = {"Authorization": "Bearer nope"}
            assert client.request(method, path, headers=wrong, **kwargs).status_code == 401, path
            right = {"Authorization": "Bearer s3cret-key"}
            assert client.request(method, path, headers=right, **kwargs).status_code == 200, path
        assert client.get("/health").status_code == 200


def test_health_answers_while_a_large_download_runs(
    open_settings: Settings, server: support.LoopbackServer
) -> None:
    urls = [server.add(f"/slow/{i}.png", support.Reply(body=png(), delay=1.0)) for i in range(4)]
    app = create_app(open_settings)

    async def scenario() -> tuple[float, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            started = time.perf_counter()
            download = asyncio.create_task(
                client.post("/download-images", json={"urls": urls, "output_name": "s"})
            )
            await asyncio.sleep(0.2)
            health = await client.get("/health")
            assert health.status_code == 200
            health_at = time.perf_counter() - started
            response = await download
            assert len(response.json()["files"]) == 4
            return health_at, time.perf_counter() - started

    health_at, done_at = asyncio.run(scenario())
    assert health_at < 0.8 < done_at


def test_delete_racing_downloads_never_answers_500_nor_leaves_a_partial_folder(
    open_client: TestClient, open_settings: Settings, server: support.LoopbackServer
) -> None:
    folder = open_settings.datasets_dir / "race"
    statuses: list[int] = []
    done = threading.Event()

    def keep_deleting() -> None:
        while not done.is_set():
            statuses.append(open_client.delete("/datasets/race").status_code)
            statuses.append(open_client.get("/datasets/race").status_code)
            statuses.append(open_client.get("/datasets").status_code)
            time.sleep(0.02 * (len(statuses) % 7))

    deleter = threading.Thread(target=keep_deleting)
    deleter.start()
    try:
        for round_ in range(8):
            urls = [
                server.add(f"/race/{round_}/{i}/img.png", support.Reply(body=png(), delay=0.01 * i))
                for i in range(4)
            ]
            response = open_client.post("/download-images", json={"urls": urls, "output_name": "race"})
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body["files"]) | set(body["failed"]) == set(urls)
            assert set(body["failed"].values()) <= {"the dataset was deleted during the download"}
    finally:
        done.set()
        deleter.join(10)
    assert set(statuses) <= {200, 404} and 200 in statuses, sorted(set(statuses))
    assert [p.name for p in open_settings.datasets_dir.iterdir() if p.name.startswith(".deleting")] == []
    if folder.exists():
        support.assert_clean_folder(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert sorted(manifest) == sorted(p.name for p in folder.glob("*.jpg"))
