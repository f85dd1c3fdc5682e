import io
import struct
import time
import zlib
from collections.abc import Callable

import pillow_heif
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from fluxtrain.datasets import images
from fluxtrain.datasets.images import ImageRejectedError, normalize_image
from tests.datasets.support import encode

LIMIT = 100_000_000


def decoded(data: bytes) -> Image.Image:
    result = normalize_image(data, max_pixels=LIMIT)
    with Image.open(io.BytesIO(result.jpeg)) as image:
        assert image.format == "JPEG"
        assert image.mode == "RGB"
        assert not image.info.get("progressive")
        assert "exif" not in image.info and "icc_profile" not in image.info
        assert (image.width, image.height) == (result.width, result.height)
        image.load()
        return image.copy()


def close(pixel: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


RED = (220, 20, 20)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 90}),
        ("WEBP", {"quality": 90}),
        ("BMP", {}),
        ("TIFF", {}),
        ("AVIF", {}),
    ],
)
def test_each_format_becomes_an_rgb_jpeg(fmt: str, params: dict) -> None:
    image = decoded(encode(Image.new("RGB", (40, 30), RED), fmt, **params))
    assert image.size == (40, 30)
    assert close(image.getpixel((20, 15)), RED, tolerance=20)


def test_heic_is_read() -> None:
    heif = pillow_heif.from_pillow(Image.new("RGB", (64, 32), RED))
    buffer = io.BytesIO()
    heif.save(buffer, quality=90)
    image = decoded(buffer.getvalue())
    assert image.size == (64, 32)
    assert close(image.getpixel((32, 16)), RED, tolerance=25)


def test_animated_gif_takes_its_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), color) for color in ((0, 0, 255), (0, 255, 0), (255, 0, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert close(decoded(data).getpixel((10, 10)), (0, 0, 255))


def test_animated_webp_takes_its_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), color) for color in ((0, 255, 0), (255, 0, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert close(decoded(data).getpixel((10, 10)), (0, 255, 0))


def test_alpha_is_composited_on_white() -> None:
    image = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 16, 16))
    result = decoded(encode(image, "PNG"))
    assert close(result.getpixel((24, 8)), (255, 255, 255))
    assert close(result.getpixel((8, 8)), (255, 0, 0), tolerance=20)


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0] + [0, 0, 255] * 255)
    data = encode(image, "PNG", transparency=0)
    assert close(decoded(data).getpixel((5, 5)), (255, 255, 255))


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert close(decoded(data).getpixel((8, 8)), (255, 0, 0), tolerance=30)


def test_grayscale_and_sixteen_bit_become_rgb() -> None:
    gray = decoded(encode(Image.new("L", (8, 8), 128), "PNG"))
    assert close(gray.getpixel((4, 4)), (128, 128, 128), tolerance=3)
    sixteen = Image.new("I;16", (8, 8), 40000)
    data = encode(sixteen, "PNG")
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode.startswith("I")
    assert close(decoded(data).getpixel((4, 4)), (156, 156, 156), tolerance=3)


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]), ([-4.0, 64.0, 128.0, 300.0], [0, 64, 128, 255])],
    ids=["unit-range", "byte-range"],
)
def test_floating_point_grey_becomes_eight_bit(values: list[float], expected: list[int]) -> None:
    """32-bit float TIFFs hold 0..1 (scaled by 255) or 0..255 (clipped); both become grey RGB."""
    source = Image.new("F", (4, 1))
    source.putdata(values)
    wide = source.resize((64, 16), Image.Resampling.NEAREST)
    data = encode(wide, "TIFF")
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "F"
    image = decoded(data)
    for index, grey in enumerate(expected):
        assert close(image.getpixel((index * 16 + 8, 8)), (grey, grey, grey), tolerance=3)


def test_a_side_longer_than_a_jpeg_holds_is_refused_from_the_header() -> None:
    data = encode(Image.new("L", (70_000, 1)), "PNG")
    started = time.perf_counter()
    with pytest.raises(ImageRejectedError, match="70000x1 px; a JPEG holds at most 65500 px a side"):
        normalize_image(data, max_pixels=LIMIT)
    assert time.perf_counter() - started < 0.5


def swapped_primaries_profile() -> bytes:
    """sRGB with its red and green primaries exchanged: pixels tagged with it mean the other colour."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", profile[128:132])[0]
    tags = {}
    for index in range(count):
        signature, offset, size = struct.unpack(">4sII", profile[132 + 12 * index : 144 + 12 * index])
        tags[signature] = (offset, size)
    (r_at, r_size), (g_at, g_size) = tags[b"rXYZ"], tags[b"gXYZ"]
    red, green = bytes(profile[r_at : r_at + r_size]), bytes(profile[g_at : g_at + g_size])
    profile[r_at : r_at + r_size], profile[g_at : g_at + g_size] = green, red
    return bytes(profile)


def _fixed(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def linear_grey_profile() -> bytes:
    """A minimal ICC v2 grey display profile with a gamma-1.0 tone curve (D50 white)."""
    d50 = _fixed(0.9642) + _fixed(1.0) + _fixed(0.8249)
    text = b"linear grey\0"
    tags = [
        (b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 3 + 67)),
        (b"wtpt", b"XYZ \0\0\0\0" + d50),
        (b"kTRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, 256)),
    ]
    table, body = b"", b""
    start = 128 + 4 + 12 * len(tags)
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", start + len(body), len(data))
        body += data
    header = struct.pack(
        ">I4s4s4s4s4s", start + len(body), b"lcms", bytes([2, 0x10, 0, 0]), b"mntr", b"GRAY", b"XYZ "
    )
    header += bytes(12) + b"acsp" + bytes(24) + d50
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def test_a_grey_profile_applies_with_or_without_alpha_and_at_sixteen_bits() -> None:
    # Value 100 in linear light is about 169 in sRGB's encoding.
    grey = Image.new("L", (8, 8), 100)
    assert close(decoded(encode(grey, "PNG", icc_profile=linear_grey_profile())).getpixel((4, 4)), (169,) * 3)
    with_alpha = Image.new("LA", (8, 8), (100, 255))
    with_alpha.paste((100, 0), (0, 0, 4, 8))
    result = decoded(encode(with_alpha, "PNG", icc_profile=linear_grey_profile()))
    assert close(result.getpixel((6, 4)), (169,) * 3) and close(result.getpixel((1, 4)), (255, 255, 255))
    deep = Image.new("I;16", (8, 8), 100 * 257)
    assert close(decoded(encode(deep, "PNG", icc_profile=linear_grey_profile())).getpixel((4, 4)), (169,) * 3)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_transparency_key_survives_a_profile(mode: str) -> None:
    image = Image.new(mode, (8, 8), 0)
    image.paste(200 if mode == "L" else (200, 0, 0), (4, 0, 8, 8))
    key = 0 if mode == "L" else (0, 0, 0)
    profile = linear_grey_profile() if mode == "L" else swapped_primaries_profile()
    result = decoded(encode(image, "PNG", icc_profile=profile, transparency=key))
    assert close(result.getpixel((1, 4)), (255, 255, 255))
    assert result.getpixel((6, 4)) != (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_colours_tagged_with_a_profile_are_converted_to_srgb(fmt: str) -> None:
    tagged = encode(Image.new("RGB", (16, 16), (230, 10, 10)), fmt, icc_profile=swapped_primaries_profile())
    assert close(decoded(tagged).getpixel((8, 8)), (10, 230, 10), tolerance=30)


def test_profile_conversion_keeps_alpha_for_compositing() -> None:
    image = Image.new("RGBA", (16, 16), (230, 10, 10, 0))
    image.paste((230, 10, 10, 255), (0, 0, 8, 16))
    result = decoded(encode(image, "PNG", icc_profile=swapped_primaries_profile()))
    assert close(result.getpixel((4, 8)), (10, 230, 10), tolerance=30)
    assert close(result.getpixel((12, 8)), (255, 255, 255))


@pytest.mark.parametrize("profile", [b"not an icc profile", None])
def test_srgb_junk_or_no_profile_leaves_the_pixels(profile: bytes | None) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb, profile):
        params = {"icc_profile": icc} if icc else {}
        assert close(decoded(encode(Image.new("RGB", (8, 8), RED), "PNG", **params)).getpixel((4, 4)), RED)


def test_exif_orientation_is_applied_then_dropped() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decoded(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert rotated.size == (20, 40)
    assert close(rotated.getpixel((10, 5)), (255, 0, 0), tolerance=30)
    assert close(rotated.getpixel((10, 35)), (0, 0, 255), tolerance=30)


@pytest.mark.parametrize(
    "body",
    [
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"<svg width='10' height='10'></svg>",
        b"\n  <!DOCTYPE html><html><body>not found</body></html>",
        b"just some text",
        b"",
    ],
)
def test_markup_and_other_bytes_are_refused(body: bytes) -> None:
    with pytest.raises(ImageRejectedError, match="not an image"):
        normalize_image(body, max_pixels=LIMIT)


def test_eps_is_not_among_the_accepted_formats() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageRejectedError, match="not an image"):
        normalize_image(eps, max_pixels=LIMIT)


def test_truncated_image_is_refused() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageRejectedError, match="truncated"):
        normalize_image(data[: len(data) // 2], max_pixels=LIMIT)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny real PNG whose header claims another size: what a decompression bomb looks like."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_pixel_count_is_checked_from_the_header_before_decoding() -> None:
    with pytest.raises(ImageRejectedError, match="decompression bomb"):
        normalize_image(png_claiming_size(30000, 30000), max_pixels=LIMIT)
    with pytest.raises(ImageRejectedError, match="decompression bomb"):
        normalize_image(encode(Image.new("RGB", (200, 100)), "PNG"), max_pixels=10_000)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_in_small_chunks(image: Image.Image, piece: int) -> bytes:
    """`image` (RGB) as a PNG whose image data is cut into IDAT chunks of `piece` bytes."""
    width, height = image.size
    rows = image.tobytes()
    raw = b"".join(b"\x00" + rows[y * width * 3 : (y + 1) * width * 3] for y in range(height))
    stream = zlib.compress(raw, 1)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
            *(_png_chunk(b"IDAT", stream[i : i + piece]) for i in range(0, len(stream), piece)),
            _png_chunk(b"IEND", b""),
        ]
    )


def test_a_png_of_millions_of_empty_chunks_is_refused_at_once() -> None:
    """Pillow reads each chunk with a Python call: these 4 million would take it about 9 s."""
    png = encode(Image.new("RGB", (64, 48), (10, 20, 30)), "PNG")
    bomb = png[:33] + _png_chunk(b"prVt", b"") * 4_000_000 + png[33:]
    started = time.perf_counter()
    refusal = f"refused: a PNG of more than {images.MAX_PNG_CHUNKS} chunks"
    with pytest.raises(ImageRejectedError, match=refusal):
        normalize_image(bomb, max_pixels=10**8)
    assert time.perf_counter() - started < 0.5


def test_a_large_png_written_in_small_chunks_is_still_read() -> None:
    """libpng writes 8 KB of image data per chunk; a 4 MP image cut into 512-byte chunks still passes."""
    noise = Image.effect_noise((2048, 2048), 64).convert("RGB")
    png = _png_in_small_chunks(noise, 512)
    assert png.count(b"IDAT") > 10_000
    assert normalize_image(png, max_pixels=10**8).width == 2048


def _gif_parts() -> tuple[bytes, bytes]:
    """A small GIF cut after its header and global palette: (head, first image onwards)."""
    gif = encode(Image.new("RGB", (16, 16), RED), "GIF")
    flags = gif[10]
    cut = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    return gif[:cut], gif[cut:]


def _sub_blocks(payload: bytes, size: int = 255) -> bytes:
    parts = (payload[start : start + size] for start in range(0, len(payload), size))
    return b"".join(bytes([len(part)]) + part for part in parts)


@pytest.mark.parametrize(
    "filler",
    [
        b"\x21\xfe\x01x\x00" * 2_000_000,  # 10 MB of one-byte comments
        b"\x21\x01" + b"\x01x" * 5_000_000 + b"\x00",  # one extension of 5 million one-byte sub-blocks
        b"\x21\xff\x0bNETSCAPE2.0\x00" + b"\x01x" * 5_000_000 + b"\x00",  # read on past an empty one
        b"\x07" * 10_000_000,  # junk between blocks, passed over a byte at a time
    ],
    ids=["comments", "sub-blocks", "after-netscape", "junk"],
)
def test_a_gif_of_millions_of_blocks_before_its_image_is_refused_at_once(filler: bytes) -> None:
    """Pillow walks these in Python, a step each: 10 MB of them would hold a worker about a second."""
    head, image = _gif_parts()
    started = time.perf_counter()
    refusal = f"refused: a GIF of more than {images.MAX_GIF_STEPS} blocks, sub-blocks or junk bytes"
    with pytest.raises(ImageRejectedError, match=refusal):
        normalize_image(head + filler + image, max_pixels=LIMIT)
    assert time.perf_counter() - started < 0.5


def test_a_gif_with_a_large_application_extension_is_still_read() -> None:
    head, image = _gif_parts()
    extension = b"\x21\xffICCRGBG1012" + _sub_blocks(bytes(range(256)) * 4096) + b"\x00"
    assert normalize_image(head + extension + image, max_pixels=LIMIT).width == 16


Commented = Callable[[str], bytes]


def _comment_gif(text: str) -> bytes:
    return encode(Image.new("RGB", (16, 16), RED), "GIF", comment=text.encode())


def _comment_cmyk_jpeg(text: str) -> bytes:
    return encode(Image.new("CMYK", (16, 16), (0, 80, 160, 20)), "JPEG", comment=text.encode())


def _comment_png(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", text)
    out = io.BytesIO()
    Image.new("RGB", (16, 16), RED).save(out, "PNG", pnginfo=info)
    return out.getvalue()


@pytest.mark.parametrize(
    ("source", "length"),
    [
        (_comment_gif, 40),
        (_comment_gif, 100_000),
        (_comment_png, 40),
        (_comment_png, 100_000),
        (_comment_cmyk_jpeg, 40),
    ],
    ids=["gif", "gif, 100 KB", "png text chunk", "png text chunk, 100 KB", "cmyk jpeg"],
)
def test_a_re_encoded_image_keeps_no_comment_of_its_source(source: Commented, length: int) -> None:
    """Pillow copies a source's comment into the JPEG it saves (and failed on one over 64 KB)."""
    text = ("private note " * (length // 13 + 1))[:length]
    result = normalize_image(source(text), max_pixels=LIMIT)
    assert result.stored == "reencoded"
    assert b"\xff\xfe" not in result.jpeg[: result.jpeg.index(b"\xff\xda")]
    assert b"private note" not in result.jpeg
