"""JPEGs that need no change are kept as their own compressed data, minus metadata; the rest are
re-encoded byte for byte as before.

"Several cameras and encoders" is approximated with Pillow's encoder in several forms: baseline,
progressive, optimised tables, 4:4:4 and 4:2:0 subsampling, restart markers, grey, and with EXIF
(GPS included), XMP, a comment and an sRGB profile attached.
"""

import asyncio
import contextlib
import io
import json
import random
import time

import pytest
from PIL import Image, ImageCms, ImageOps

from fluxtrain.datasets import images
from fluxtrain.datasets.images import ImageRejectedError, NormalizedImage, normalize_image, reencode_image
from fluxtrain.datasets.ingest import download_images
from fluxtrain.datasets.jpeg_markers import MAX_STEPS, MalformedJpegError, strip_metadata
from fluxtrain.settings import Settings
from tests.datasets.support import LoopbackServer, Reply, encode
from tests.datasets.test_images import linear_grey_profile, swapped_primaries_profile

LIMIT = 100_000_000
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="48,51.5N"/>'
    b"</rdf:RDF></x:xmpmeta>"
)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def photo(mode: str = "RGB", size: tuple[int, int] = (96, 64)) -> Image.Image:
    noise = Image.effect_noise(size, 60)
    if mode == "L":
        return noise
    return Image.merge("RGB", (noise, noise.rotate(90), Image.linear_gradient("L").resize(size)))


def gps_exif(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "FakeCam"
    exif[0x0110] = "Model 7"
    if orientation is not None:
        exif[0x0112] = orientation
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 30.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    return exif.tobytes()


def previous_normalize(data: bytes, *, max_pixels: int) -> NormalizedImage:
    """normalize_image as it was before JPEGs were kept (commit da48d65), the reference output."""
    with images._open(data, max_pixels) as image:
        frame = images._load_first_frame(image)
        icc = frame.info.get("icc_profile")
        try:
            upright = ImageOps.exif_transpose(frame)
        except (OSError, ValueError, SyntaxError, KeyError, TypeError):
            upright = frame
        try:
            rgb = images._to_rgb(upright, icc)
        except (OSError, ValueError) as exc:
            raise ImageRejectedError(f"unsupported image mode {upright.mode}: {exc}") from exc
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=95, optimize=False, progressive=False)
    return NormalizedImage(jpeg=out.getvalue(), width=rgb.width, height=rgb.height)


CLEAN_FORMS = {
    "baseline q90": ("RGB", {"quality": 90}),
    "progressive": ("RGB", {"quality": 85, "progressive": True}),
    "optimised tables": ("RGB", {"quality": 80, "optimize": True}),
    "4:4:4": ("RGB", {"quality": 92, "subsampling": 0}),
    "4:2:0": ("RGB", {"quality": 75, "subsampling": 2}),
    "restart markers": ("RGB", {"quality": 88, "restart_marker_blocks": 3}),
    "EXIF with GPS": ("RGB", {"quality": 90, "exif": gps_exif()}),
    "EXIF orientation 1": ("RGB", {"quality": 90, "exif": gps_exif(orientation=1)}),
    "XMP": ("RGB", {"quality": 90, "xmp": XMP}),
    "comment": ("RGB", {"quality": 90, "comment": b"shot on a FakeCam"}),
    "sRGB profile": ("RGB", {"quality": 90, "icc_profile": SRGB}),
    "grey": ("L", {"quality": 90}),
    "grey progressive with EXIF": ("L", {"quality": 90, "progressive": True, "exif": gps_exif()}),
}


def segments(data: bytes) -> tuple[list[int], int]:
    """The markers of the segments before the first scan, and where that scan's SOS starts."""
    markers, position = [], 2
    while data[position + 1] != 0xDA:
        markers.append(data[position + 1])
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return markers, position


@pytest.mark.parametrize("form", list(CLEAN_FORMS))
def test_a_clean_jpeg_is_kept_with_its_pixels_and_without_metadata(form: str) -> None:
    mode, params = CLEAN_FORMS[form]
    source = encode(photo(mode), "JPEG", **params)
    result = normalize_image(source, max_pixels=LIMIT)
    assert result.stored == "kept"
    assert (result.width, result.height) == (96, 64)
    with Image.open(io.BytesIO(source)) as original, Image.open(io.BytesIO(result.jpeg)) as kept:
        assert kept.format == "JPEG" and kept.mode == original.mode == mode
        assert bool(kept.info.get("progressive")) == bool(params.get("progressive"))
        assert kept.tobytes() == original.tobytes()
        assert not kept.getexif()
        assert "icc_profile" not in kept.info and "xmp" not in kept.info and "comment" not in kept.info
    markers, _ = segments(result.jpeg)
    assert not {0xE1, 0xE2, 0xED, 0xFE} & set(markers)
    for leak in (b"Exif", b"FakeCam", b"ns.adobe.com", b"GPS", b"shot on"):
        assert leak not in result.jpeg
    _, first_scan = segments(source)
    assert result.jpeg.endswith(source[first_scan:]), "scan data must be copied verbatim"
    assert len(result.jpeg) <= len(source)


def test_an_mpo_keeps_its_first_picture_only() -> None:
    first, second = photo(), photo().rotate(180)
    source = encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(io.BytesIO(source)) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
        pixels = opened.tobytes()
    result = normalize_image(source, max_pixels=LIMIT)
    assert result.stored == "kept"
    with Image.open(io.BytesIO(result.jpeg)) as kept:
        assert kept.format == "JPEG" and kept.tobytes() == pixels
    assert result.jpeg.count(b"\xff\xd8") == 1


NEEDS_CHANGE = {
    "EXIF orientation 6": lambda: encode(photo(), "JPEG", quality=90, exif=gps_exif(orientation=6)),
    "XMP orientation 8": lambda: encode(
        photo(), "JPEG", quality=90, xmp=b"<x:xmpmeta><tiff:Orientation>8</tiff:Orientation></x:xmpmeta>"
    ),
    "CMYK": lambda: encode(photo().convert("CMYK"), "JPEG", quality=90),
    "non-sRGB profile": lambda: encode(photo(), "JPEG", quality=90, icc_profile=swapped_primaries_profile()),
    "grey with a profile": lambda: encode(photo("L"), "JPEG", quality=90, icc_profile=linear_grey_profile()),
    "junk profile": lambda: encode(photo(), "JPEG", quality=90, icc_profile=b"not an icc profile"),
    "PNG": lambda: encode(photo(), "PNG"),
    "WEBP": lambda: encode(photo(), "WEBP", quality=90),
}


@pytest.mark.parametrize("form", list(NEEDS_CHANGE))
def test_an_image_that_needs_a_change_is_reencoded_exactly_as_before(form: str) -> None:
    source = NEEDS_CHANGE[form]()
    result = normalize_image(source, max_pixels=LIMIT)
    assert result.stored == "reencoded"
    assert result == previous_normalize(source, max_pixels=LIMIT)
    assert result == reencode_image(source, max_pixels=LIMIT)


def test_a_rotated_jpeg_is_stored_upright() -> None:
    result = normalize_image(NEEDS_CHANGE["EXIF orientation 6"](), max_pixels=LIMIT)
    assert (result.width, result.height) == (64, 96)


def test_the_pixel_cap_applies_to_kept_jpegs() -> None:
    source = encode(photo(), "JPEG", quality=90)
    with pytest.raises(ImageRejectedError, match="decompression bomb"):
        normalize_image(source, max_pixels=96 * 64 - 1)


def outcome(function, data: bytes) -> tuple[str, object]:
    try:
        return "stored", function(data, max_pixels=LIMIT)
    except ImageRejectedError as exc:
        return "refused", str(exc)


def assert_decode_decides(data: bytes) -> None:
    """Either kept (and then pixel-exact) or exactly what the previous path did with these bytes."""
    kind, value = outcome(normalize_image, data)
    if kind == "stored" and value.stored == "kept":
        with Image.open(io.BytesIO(data)) as original, Image.open(io.BytesIO(value.jpeg)) as kept:
            assert kept.tobytes() == original.tobytes()
        return
    assert (kind, value) == outcome(previous_normalize, data)


def with_length(data: bytes, marker: bytes, length: int) -> bytes:
    at = data.index(marker)
    return data[: at + 2] + length.to_bytes(2, "big") + data[at + 4 :]


def hostile_variants() -> dict[str, bytes]:
    clean = encode(photo(), "JPEG", quality=90, exif=gps_exif())
    sos = clean.index(b"\xff\xda")
    return {
        "truncated in the scan": clean[: sos + (len(clean) - sos) // 2],
        "truncated in the headers": clean[: sos - 10],
        "no EOI": clean[:-2],
        "APP1 length past the end": with_length(clean, b"\xff\xe1", 0xFFFF),
        "APP1 length 0": with_length(clean, b"\xff\xe1", 0),
        "APP1 length 1": with_length(clean, b"\xff\xe1", 1),
        "DQT length too short": with_length(clean, b"\xff\xdb", 3),
        "SOF length past the end": with_length(clean, b"\xff\xc0", 0xFFF0),
        "only SOI": b"\xff\xd8",
        "SOI then EOI": b"\xff\xd8\xff\xd9",
        "junk after SOI": b"\xff\xd8" + bytes(range(256)) * 4,
        "12-bit claim": clean.replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1),
    }


@pytest.mark.parametrize("name", list(hostile_variants()))
def test_a_hostile_jpeg_falls_back_to_the_decode_path(name: str) -> None:
    assert_decode_decides(hostile_variants()[name])


def test_random_damage_never_crashes_and_the_decode_path_decides() -> None:
    clean = encode(photo(), "JPEG", quality=90, exif=gps_exif(), xmp=XMP)
    generator = random.Random(15)
    for _ in range(60):
        damaged = bytearray(clean)
        for _ in range(generator.randint(1, 4)):
            damaged[generator.randrange(2, min(len(damaged), 900))] = generator.randrange(256)
        assert_decode_decides(bytes(damaged))


@pytest.mark.parametrize("where", ["anywhere", "in the scans"])
def test_the_skeleton_check_refuses_exactly_what_a_full_decode_refuses(where: str) -> None:
    """Damaged files in every clean form: kept only when the whole file decodes (then pixel-exact),
    otherwise decided by the decode path. Enough of them must have a sound marker structure and
    still fail to decode (the cases only the skeleton check catches) for this to mean something."""
    generator = random.Random(1 if where == "anywhere" else 2)
    forms = list(CLEAN_FORMS.values())
    refused = 0
    for trial in range(300):
        mode, params = forms[trial % len(forms)]
        size = (generator.randint(8, 160), generator.randint(8, 160))
        clean = encode(photo(mode, size), "JPEG", **params)
        first = 2 if where == "anywhere" else clean.index(b"\xff\xda") + 14
        damaged = bytearray(clean)
        for _ in range(generator.randint(1, 6)):
            damaged[generator.randrange(first, len(damaged) - 2)] = generator.randrange(256)
        with contextlib.suppress(MalformedJpegError):
            strip_metadata(bytes(damaged))
            refused += outcome(previous_normalize, bytes(damaged))[0] == "refused"
        assert_decode_decides(bytes(damaged))
    assert refused >= (20 if where == "anywhere" else 3)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def test_a_progressive_scan_whose_dc_values_overflow_is_not_kept() -> None:
    """libjpeg's progressive decoder refuses a DC value past the int range, a fact of the entropy
    data alone: 69,696 blocks (2112x2112 grey) of +32767 each. Such a file is decoded whole."""
    side, one_code = 2112, bytes([1] + [0] * 15)
    data = b"".join(
        [
            b"\xff\xd8",
            segment(0xDB, b"\x00" + bytes([1] * 64)),
            segment(0xC2, (8).to_bytes(1, "big") + side.to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"),
            segment(0xC4, b"\x00" + one_code + bytes([15])),
            segment(0xDA, b"\x01\x01\x00\x00\x00\x00"),
            b"\x7f\xff\x00" * (side // 8) ** 2,
            b"\xff\xd9",
        ]
    )
    assert outcome(previous_normalize, data)[0] == "refused"
    assert_decode_decides(data)


def with_empty_scans(data: bytes, count: int) -> bytes:
    """`data` with `count` more (empty) AC scans of its first component before EOI."""
    empty_scan = segment(0xDA, b"\x01\x01\x00\x01\x3f\x00")
    return data[:-2] + empty_scan * count + data[-2:]


def test_a_jpeg_of_more_scans_than_any_encoder_writes_is_refused_before_decoding() -> None:
    source = encode(photo("L"), "JPEG", quality=85, progressive=True)
    bomb = with_empty_scans(source, images.MAX_JPEG_SCANS)
    assert outcome(normalize_image, bomb) == (
        "refused",
        f"decompression bomb: a JPEG of more than {images.MAX_JPEG_SCANS} scans",
    )
    assert_decode_decides(with_empty_scans(source, 100))


def test_the_skeleton_keeps_every_segment_and_no_scan_data() -> None:
    stripped = strip_metadata(encode(photo(), "JPEG", quality=85, progressive=True))
    clean, skeleton = stripped.jpeg, stripped.skeleton
    assert segments(skeleton)[0] == segments(clean)[0]
    assert skeleton.count(b"\xff\xda") == clean.count(b"\xff\xda") > 1
    assert skeleton.endswith(b"\xff\xd9") and len(skeleton) < len(clean) // 4
    assert stripped.scans == clean.count(b"\xff\xda")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe1\x00",
        b"\xff\xd8\xff\xd9",
        b"\xff\xd8\xff\xc3\x00\x02",
    ],
)
def test_the_rewriter_refuses_what_it_cannot_vouch_for(data: bytes) -> None:
    with pytest.raises(MalformedJpegError):
        strip_metadata(data)


def test_the_manifest_says_which_images_were_kept(server: LoopbackServer, open_settings: Settings) -> None:
    clean = encode(photo(), "JPEG", quality=90, exif=gps_exif())
    rotated = NEEDS_CHANGE["EXIF orientation 6"]()
    urls = [
        server.add("/clean.jpg", Reply(body=clean)),
        server.add("/rotated.jpg", Reply(body=rotated)),
        server.add("/drawing.png", Reply(body=encode(photo(), "PNG"))),
    ]
    result = asyncio.run(download_images(settings=open_settings, name="set", urls=urls))
    assert result.failed == {}
    folder = open_settings.datasets_dir / "set"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {name: entry["stored"] for name, entry in manifest.items()} == {
        "clean.jpg": "kept",
        "rotated.jpg": "reencoded",
        "drawing.jpg": "reencoded",
    }
    assert (folder / "clean.jpg").read_bytes() == strip_metadata(clean).jpeg


def test_scan_markers_inside_metadata_do_not_count_as_scans() -> None:
    """The bound counts the scans a decoder would run, which the stripping walk counts: bytes that
    only look like SOS markers inside a comment do not make a clean file a bomb."""
    clean = encode(photo(), "JPEG", quality=90)
    noisy = clean[:2] + segment(0xFE, b"\xff\xda" * (images.MAX_JPEG_SCANS + 1)) + clean[2:]
    kept = normalize_image(noisy, max_pixels=LIMIT)
    assert (kept.stored, kept.jpeg) == ("kept", strip_metadata(clean).jpeg)


@pytest.mark.parametrize("form", list(CLEAN_FORMS))
def test_the_walk_says_which_files_carry_orientation_or_colour_tags(form: str) -> None:
    """Only a tagged file (EXIF, XMP, ICC) is opened as it came; the others are judged stripped."""
    mode, params = CLEAN_FORMS[form]
    stripped = strip_metadata(encode(photo(mode), "JPEG", **params))
    assert stripped.tagged == bool({"exif", "xmp", "icc_profile"} & params.keys())
    assert stripped.progressive == bool(params.get("progressive"))


EMPTY_COMMENTS = b"\xff\xfe\x00\x02" * (4 * 1024 * 1024)  # 16 MB, 4 million segments


@pytest.mark.parametrize(
    "prefix",
    [b"", b"\xff\xd9", b"\xff\x00\x00\x00", b"\xff\xd0", b"\xff\xfe\x00\x00", b"\xff\xc8"],
    ids=["plain", "EOI first", "stuffed and junk", "RST first", "length 0", "JPG marker"],
)
def test_a_jpeg_of_millions_of_empty_segments_is_refused_at_once(prefix: bytes) -> None:
    """Whatever comes first, Pillow's header parser would read 4 million segments in Python (4 s)."""
    clean = encode(photo(), "JPEG", quality=90)
    bomb = clean[:2] + prefix + EMPTY_COMMENTS + clean[2:]
    started = time.perf_counter()
    kind, reason = outcome(normalize_image, bomb)
    assert time.perf_counter() - started < 0.5
    assert (kind, reason) == (
        "refused",
        f"refused: a JPEG of more than {images.MAX_JPEG_HEADER_STEPS} segments, fill or junk bytes "
        "before its image data",
    )


@pytest.mark.parametrize("filler", [b"\xff", b"\x00"], ids=["fill bytes", "junk bytes"])
def test_a_jpeg_padded_with_millions_of_bytes_before_its_frame_is_refused_at_once(filler: bytes) -> None:
    """Pillow steps over fill and junk bytes one Python call each."""
    clean = encode(photo(), "JPEG", quality=90, exif=gps_exif(orientation=6))
    bomb = clean[:2] + b"\xff" + filler * (16 * 1024 * 1024) + clean[2:]
    started = time.perf_counter()
    assert outcome(normalize_image, bomb)[0] == "refused"
    assert time.perf_counter() - started < 0.5


def test_a_few_fill_bytes_between_segments_are_read_as_before() -> None:
    clean = encode(photo(), "JPEG", quality=90)
    padded = clean[:2] + b"\xff" * 200 + clean[2:]
    assert images._pillow_header_steps(clean, images.MAX_JPEG_HEADER_STEPS) < 20
    result = normalize_image(padded, max_pixels=LIMIT)
    assert (result.stored, result.jpeg) == ("kept", strip_metadata(clean).jpeg)


def test_a_jpeg_whose_segments_after_the_scan_run_into_millions_is_re_encoded_quickly() -> None:
    """The stripping walk gives up past MAX_STEPS; libjpeg skips such segments in C."""
    clean = encode(photo(), "JPEG", quality=90)
    padded = clean[:-2] + b"\xff\xfe\x00\x02" * 1_000_000 + clean[-2:]
    with pytest.raises(MalformedJpegError, match=f"more than {MAX_STEPS} segments and fill bytes"):
        strip_metadata(padded)
    started = time.perf_counter()
    result = normalize_image(padded, max_pixels=LIMIT)
    assert result.stored == "reencoded" and (result.width, result.height) == (96, 64)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "segment_bytes",
    [segment(0xE0, b"JFIF"), segment(0xE0, b"JFIFX"), segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04")],
    ids=["short JFIF", "JFIF without its NUL", "truncated Photoshop"],
)
def test_a_dropped_segment_pillow_stumbles_on_is_left_to_the_decode_path(segment_bytes: bytes) -> None:
    """Such a file counts as tagged, so it is opened as it came and refused as it always was."""
    clean = encode(photo(), "JPEG", quality=90)
    odd = clean[:2] + segment_bytes + clean[2:]
    assert strip_metadata(odd).tagged
    assert outcome(normalize_image, odd) == outcome(previous_normalize, odd)
