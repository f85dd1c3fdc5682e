"""Uploaded images: identity by content, never replacing another image, one report per part, file modes."""

import asyncio
import hashlib
import io
import os
import stat
import zipfile

from PIL import Image

from fluxtrain.datasets.ingest import DownloadResult, add_uploads, download_images
from fluxtrain.datasets.store import read_manifest
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer, Reply, encode


def png(colour: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    return encode(Image.new("RGB", size, colour), "PNG")


def upload(settings: Settings, *parts: tuple[str, bytes]) -> DownloadResult:
    handles = [(name, io.BytesIO(data)) for name, data in parts]
    return asyncio.run(add_uploads(settings=settings, name="set", uploads=handles))


def test_different_bytes_under_a_used_name_get_their_own_file(settings: Settings) -> None:
    red, blue = png((255, 0, 0)), png((0, 0, 255), (20, 10))
    folder = settings.datasets_dir / "set"
    first = upload(settings, ("IMG_0001.png", red))
    assert first.files == {"IMG_0001.png": str(folder / "IMG_0001.jpg")}
    (folder / "IMG_0001.txt").write_text("mycat, a red square", encoding="utf-8")
    before = (folder / "IMG_0001.jpg").read_bytes()

    second = upload(settings, ("IMG_0001.png", blue))

    assert second.files == {"IMG_0001.png": str(folder / "IMG_0001-2.jpg")}
    assert (folder / "IMG_0001.jpg").read_bytes() == before
    manifest = read_manifest(folder)
    assert manifest["IMG_0001.jpg"]["sha256"] == hashlib.sha256(red).hexdigest()
    assert manifest["IMG_0001-2.jpg"] == {
        "url": None,
        "upload": "IMG_0001.png",
        "sha256": hashlib.sha256(blue).hexdigest(),
        "bytes": len(blue),
        "width": 20,
        "height": 10,
        "stored": "reencoded",
    }


def test_the_same_bytes_keep_their_one_file_untouched(settings: Settings) -> None:
    red = png((255, 0, 0))
    folder = settings.datasets_dir / "set"
    upload(settings, ("a.png", red))
    inode = (folder / "a.jpg").stat().st_ino

    again = upload(settings, ("a.png", red), ("renamed.png", red))

    assert again.files == {"a.png": str(folder / "a.jpg"), "renamed.png": str(folder / "a.jpg")}
    assert (folder / "a.jpg").stat().st_ino == inode
    assert sorted(p.name for p in folder.glob("*.jpg")) == ["a.jpg"]
    assert read_manifest(folder)["a.jpg"]["upload"] == "a.png"


def test_concurrent_uploads_of_the_same_bytes_save_one_file(settings: Settings) -> None:
    red = png((255, 0, 0))

    async def both() -> list[DownloadResult]:
        return await asyncio.gather(
            *(
                add_uploads(settings=settings, name="set", uploads=[(name, io.BytesIO(red))])
                for name in ("x.png", "y.png")
            )
        )

    first, second = asyncio.run(both())
    assert list(first.files.values()) == list(second.files.values())
    assert len(list((settings.datasets_dir / "set").glob("*.jpg"))) == 1


def test_repeated_labels_in_one_request_are_each_reported_once(settings: Settings) -> None:
    red, green, blue = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))
    folder = settings.datasets_dir / "set"
    result = upload(
        settings,
        ("IMG_0001.png", red),
        ("IMG_0001.png", green),
        ("IMG_0001.png", b"not an image"),
        ("IMG_0001.png", blue),
    )
    assert result.files == {
        "IMG_0001.png": str(folder / "IMG_0001.jpg"),
        "IMG_0001.png#2": str(folder / "IMG_0001-2.jpg"),
        "IMG_0001.png#4": str(folder / "IMG_0001-3.jpg"),
    }
    assert list(result.failed) == ["IMG_0001.png#3"]
    assert len(set(result.files.values())) == 3


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def test_a_zip_with_nothing_to_read_is_reported_not_passed_over(settings: Settings) -> None:
    """Every part is reported once: an archive of only folders, hidden files and macOS forks too."""
    skipped_only = _zip({"photos/": b"", "photos/.DS_Store": b"x", "__MACOSX/photos/._a.png": b"x"})
    parts = [("empty.zip", _zip({})), ("skipped.zip", skipped_only), ("a.png", png((1, 2, 3)))]
    result = upload(settings, *parts)
    reason = "the archive holds no files (folders, hidden files and __MACOSX/ are skipped)"
    assert result.failed == {"empty.zip": reason, "skipped.zip": reason}
    assert list(result.files) == ["a.png"]


def test_saved_images_are_readable_by_all(
    settings: Settings, server: LoopbackServer, open_settings: Settings
) -> None:
    old_umask = os.umask(0o077)
    try:
        uploaded = upload(settings, ("a.png", png((1, 2, 3))))
        url = server.add("/b.png", Reply(body=png((4, 5, 6))))
        downloaded = asyncio.run(download_images(settings=open_settings, name="set", urls=[url]))
    finally:
        os.umask(old_umask)
    for path in [*uploaded.files.values(), *downloaded.files.values()]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
