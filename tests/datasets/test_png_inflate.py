"""PNGs inflated by ISA-L decode to the same pixels, hence the same stored JPEG, as Pillow alone;
whatever the repacker does not take, or cannot parse, is decided by Pillow exactly as before."""

import io
import random
import struct
import tracemalloc
import zlib

import pytest
from PIL import Image, PngImagePlugin

from fluxtrain.datasets.images import reencode_image
from fluxtrain.datasets.png_inflate import MAX_CHUNKS, repacked
from tests.datasets.support import encode
from tests.datasets.test_images import swapped_primaries_profile
from tests.datasets.test_kept_jpeg import LIMIT, outcome, photo, previous_normalize


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(
    width: int,
    height: int,
    channels: int,
    *,
    seed: int,
    idat_size: int = 1000,
    extra: bytes = b"",
    checksum: bool = True,
) -> bytes:
    """Random filtered scanlines, every one of the five filter types, in IDAT chunks of `idat_size`."""
    generator = random.Random(seed)
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(
        bytes([generator.randrange(5)]) + generator.randbytes(width * channels) for _ in range(height)
    )
    stream = zlib.compress(rows, 6)
    stream = (stream if checksum else stream[:-4]) + extra
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    idats = b"".join(chunk(b"IDAT", stream[at : at + idat_size]) for at in range(0, len(stream), idat_size))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idats + chunk(b"IEND", b"")


def with_text_after_image_data(data: bytes) -> bytes:
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk(b"tEXt", b"Comment\x00after the image") + data[end:]


def palette_with_transparency() -> bytes:
    image = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(image, "PNG", transparency=3)


def oriented_png() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(), "PNG", exif=exif.tobytes())


def with_profile() -> bytes:
    return encode(photo(), "PNG", icc_profile=swapped_primaries_profile())


def apng() -> bytes:
    frames = [photo(), photo().rotate(180)]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)


def text_chunks() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "a phone")
    info.add_itxt("Description", "très bien", zip=True)
    return encode(photo(), "PNG", pnginfo=info)


TAKEN = {
    "RGB photo": lambda: encode(photo(), "PNG"),
    "RGBA": lambda: encode(photo().convert("RGBA"), "PNG"),
    "grey": lambda: encode(photo("L"), "PNG"),
    "grey with alpha": lambda: encode(photo("L").convert("LA"), "PNG"),
    "palette with transparency": palette_with_transparency,
    "RGB with a tRNS colour key": lambda: encode(photo(), "PNG", transparency=(0, 0, 0)),
    "EXIF orientation 6": oriented_png,
    "ICC profile": with_profile,
    "text and compressed text": text_chunks,
    "text after the image data": lambda: with_text_after_image_data(encode(photo(), "PNG")),
    "animated (first frame)": apng,
    "1x1": lambda: encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"),
    "every filter type, RGB": lambda: handmade_png(97, 61, 3, seed=1),
    "every filter type, RGBA": lambda: handmade_png(33, 40, 4, seed=2),
    "every filter type, grey": lambda: handmade_png(130, 17, 1, seed=3),
    "every filter type, grey+alpha": lambda: handmade_png(5, 300, 2, seed=4),
    "one IDAT chunk": lambda: handmade_png(64, 64, 3, seed=5, idat_size=1 << 20),
    "one-byte IDAT chunks": lambda: handmade_png(8, 8, 3, seed=6, idat_size=1),
    "over 64 KiB of scanlines": lambda: handmade_png(300, 100, 3, seed=7),
}

NOT_TAKEN = {
    "16-bit grey": lambda: encode(Image.linear_gradient("L").convert("I;16"), "PNG"),
    "1-bit": lambda: encode(photo("L").convert("1"), "PNG"),
    "interlaced": lambda: interlaced(),
}


def interlaced() -> bytes:
    data = bytearray(handmade_png(16, 16, 3, seed=8))
    data[28] = 1
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("name", list(TAKEN))
def test_a_repacked_png_gives_the_same_pixels_and_the_same_jpeg(name: str) -> None:
    data = TAKEN[name]()
    fast = repacked(data)
    assert fast is not None
    with Image.open(io.BytesIO(data)) as original, Image.open(io.BytesIO(fast)) as inflated:
        assert inflated.mode == original.mode
        assert inflated.tobytes() == original.tobytes()
        assert inflated.info == original.info
    assert reencode_image(data, max_pixels=LIMIT) == previous_normalize(data, max_pixels=LIMIT)


@pytest.mark.parametrize("name", list(NOT_TAKEN))
def test_what_the_repacker_does_not_take_goes_to_pillow_unchanged(name: str) -> None:
    data = NOT_TAKEN[name]()
    assert repacked(data) is None
    assert outcome(reencode_image, data) == outcome(previous_normalize, data)


def hostile_variants() -> dict[str, bytes]:
    clean = handmade_png(40, 30, 3, seed=9, idat_size=500)
    first_idat = clean.index(b"IDAT") - 4
    second_idat = clean.index(b"IDAT", first_idat + 8) - 4
    return {
        "truncated in the image data": clean[: len(clean) // 2],
        "no IEND": clean[:-12],
        "chunk length past the end": clean[:first_idat] + b"\x7f\xff\xff\xff" + clean[first_idat + 4 :],
        "a chunk between IDATs": clean[:second_idat] + chunk(b"tEXt", b"k\x00v") + clean[second_idat:],
        "corrupt deflate": clean[: first_idat + 20] + b"\xff" * 40 + clean[first_idat + 60 :],
        "fewer scanlines than IHDR says": handmade_png(40, 30, 3, seed=9)[:16]
        + struct.pack(">II", 40, 31)
        + handmade_png(40, 30, 3, seed=9)[24:],
        "data after the zlib stream": handmade_png(20, 20, 3, seed=10, extra=b"trailing bytes"),
        "zero width": clean[:16] + struct.pack(">I", 0) + clean[20:],
        "only the signature": b"\x89PNG\r\n\x1a\n",
    }


@pytest.mark.parametrize("name", list(hostile_variants()))
def test_a_hostile_png_is_decided_as_before(name: str) -> None:
    data = hostile_variants()[name]
    assert outcome(reencode_image, data) == outcome(previous_normalize, data)


def test_random_damage_never_crashes_and_pillow_decides_as_before() -> None:
    clean = handmade_png(48, 32, 4, seed=11, idat_size=700)
    generator = random.Random(15)
    for _ in range(80):
        damaged = bytearray(clean)
        for _ in range(generator.randint(1, 4)):
            damaged[generator.randrange(8, len(damaged))] = generator.randrange(256)
        assert outcome(reencode_image, bytes(damaged)) == outcome(previous_normalize, bytes(damaged))


def test_image_data_that_inflates_past_its_header_is_not_inflated_whole() -> None:
    """A 64x64 header over 256 MiB of zeros: refused by the repacker after a bounded inflate."""
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    deflater = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    bomb = b"".join(deflater.compress(zeros) for _ in range(256)) + deflater.flush()
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bomb) + chunk(b"IEND", b"")
    tracemalloc.start()
    try:
        assert repacked(data) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


def with_zlib_header(data: bytes, header: bytes) -> bytes:
    at = data.index(b"IDAT") + 4
    return data[:at] + header + data[at + 2 :]


def test_a_stream_zlib_refuses_is_left_to_pillow() -> None:
    clean = handmade_png(24, 24, 3, seed=12, idat_size=1 << 20)
    window_64k = with_zlib_header(clean, bytes([0x88, 0x1C]))  # CINFO 8: ISA-L would take it
    no_trailer = handmade_png(24, 24, 3, seed=12, checksum=False)
    for data in (window_64k, no_trailer):
        assert repacked(data) is None
        assert outcome(reencode_image, data) == outcome(previous_normalize, data)
    assert outcome(previous_normalize, window_64k)[0] == "refused"


@pytest.mark.parametrize("kind", [b"IDAT", b"tEXt"])
def test_a_png_of_many_tiny_chunks_is_left_to_pillow(kind: bytes) -> None:
    clean = handmade_png(16, 16, 3, seed=13, idat_size=1 << 20)
    end = clean.index(b"IEND") - 4
    data = clean[:end] + chunk(kind, b"") * MAX_CHUNKS + clean[end:]
    assert repacked(data) is None
