"""Kept JPEGs from real encoders and real metadata writers, not only Pillow: libjpeg-turbo's
`cjpeg` (baseline, progressive, optimised, restart intervals, 4:4:4, grey), `jpegtran`
(lossless re-coding with every marker copied), and `exiftool` writing what cameras and photo
tools write (camera EXIF with GPS and an embedded thumbnail, XMP, IPTC, an ICC profile, a comment).
Each is kept with its exact pixels and without any of that metadata. The tools are Debian's
(`libjpeg-turbo-progs`, `libimage-exiftool-perl`, installed by .ci/run)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageCms

from fluxtrain.datasets.images import normalize_image
from tests.datasets.test_kept_jpeg import photo, segments

LIMIT = 100_000_000
TOOLS = ("cjpeg", "jpegtran", "exiftool")
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS), reason="needs cjpeg, jpegtran and exiftool"
)
CJPEG_FORMS = {
    "cjpeg baseline q90": ["-quality", "90"],
    "cjpeg progressive": ["-quality", "85", "-progressive"],
    "cjpeg optimised": ["-quality", "80", "-optimize"],
    "cjpeg restart every 2 rows": ["-quality", "88", "-restart", "2"],
    "cjpeg 4:4:4": ["-quality", "92", "-sample", "1x1"],
    "cjpeg grey": ["-quality", "90", "-grayscale"],
}
CAMERA_TAGS = [
    "-Make=FakeCam",
    "-Model=Model 7",
    "-DateTimeOriginal=2026:11:30 10:15:00",
    "-GPSLatitude=48.8583",
    "-GPSLatitudeRef=N",
    "-GPSLongitude=2.2945",
    "-GPSLongitudeRef=E",
    "-Orientation#=1",
    "-XMP-dc:Creator=Somebody Private",
    "-IPTC:City=Secret City",
    "-Comment=shot on a FakeCam",
]
LEAKS = (
    b"Exif",
    b"FakeCam",
    b"Model 7",
    b"Somebody Private",
    b"Secret City",
    b"shot on",
    b"ICC_PROFILE",
)


def _run(*command: str | Path) -> None:
    subprocess.run([str(part) for part in command], check=True, capture_output=True)


def _tags(jpeg: Path) -> str:
    return subprocess.run(["exiftool", "-a", str(jpeg)], check=True, capture_output=True, text=True).stdout


def _cjpeg(tmp_path: Path, mode: str, options: list[str]) -> Path:
    source = tmp_path / "source.ppm"
    photo(mode, (120, 80)).save(source, "PPM")
    target = tmp_path / "cjpeg.jpg"
    _run("cjpeg", *options, "-outfile", target, source)
    return target


def _with_camera_metadata(tmp_path: Path, jpeg: Path) -> Path:
    """The file with camera EXIF (GPS, an IFD1 thumbnail), XMP, IPTC, an sRGB profile, a comment."""
    thumbnail = tmp_path / "thumb.jpg"
    photo("RGB", (40, 30)).save(thumbnail, "JPEG", quality=70)
    profile = tmp_path / "srgb.icc"
    profile.write_bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    _run("exiftool", "-q", "-overwrite_original", *CAMERA_TAGS, f"-ThumbnailImage<={thumbnail}", jpeg)
    if Image.open(jpeg).mode == "RGB":
        _run("exiftool", "-q", "-overwrite_original", f"-ICC_Profile<={profile}", jpeg)
    return jpeg


def _assert_kept_clean(data: bytes) -> None:
    result = normalize_image(data, max_pixels=LIMIT)
    assert result.stored == "kept"
    with Image.open(io.BytesIO(data)) as original, Image.open(io.BytesIO(result.jpeg)) as kept:
        assert (kept.size, kept.mode) == (original.size, original.mode)
        assert kept.tobytes() == original.tobytes()
        assert not kept.getexif()
        assert not {"icc_profile", "xmp", "comment", "exif"} & set(kept.info)
    markers, _ = segments(result.jpeg)
    assert not {0xE1, 0xE2, 0xED, 0xFE} & set(markers)
    for leak in LEAKS:
        assert leak not in result.jpeg, leak
    _, first_scan = segments(data)
    assert result.jpeg.endswith(data[first_scan:]), "scan data must be copied verbatim"


@pytest.mark.parametrize("form", list(CJPEG_FORMS))
def test_libjpeg_turbo_files_with_camera_metadata_are_kept_clean(tmp_path: Path, form: str) -> None:
    mode = "L" if "grey" in form else "RGB"
    jpeg = _with_camera_metadata(tmp_path, _cjpeg(tmp_path, mode, CJPEG_FORMS[form]))
    data = jpeg.read_bytes()
    assert b"Secret City" in data and b"Somebody Private" in data and b"FakeCam" in data
    assert "GPS Latitude" in _tags(jpeg)
    _assert_kept_clean(data)


def test_a_jpegtran_recoded_file_with_every_marker_copied_is_kept_clean(tmp_path: Path) -> None:
    tagged = _with_camera_metadata(tmp_path, _cjpeg(tmp_path, "RGB", ["-quality", "90"]))
    recoded = tmp_path / "recoded.jpg"
    _run("jpegtran", "-copy", "all", "-progressive", "-optimize", "-outfile", recoded, tagged)
    data = recoded.read_bytes()
    assert b"FakeCam" in data
    _assert_kept_clean(data)


def test_a_camera_file_that_says_rotate_is_reencoded_upright(tmp_path: Path) -> None:
    jpeg = _with_camera_metadata(tmp_path, _cjpeg(tmp_path, "RGB", ["-quality", "90"]))
    _run("exiftool", "-q", "-overwrite_original", "-Orientation#=6", jpeg)
    result = normalize_image(jpeg.read_bytes(), max_pixels=LIMIT)
    assert result.stored == "reencoded"
    assert (result.width, result.height) == (80, 120)
    assert b"FakeCam" not in result.jpeg and b"Exif" not in result.jpeg
