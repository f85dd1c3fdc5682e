"""Turning any accepted image bytes into the one form a dataset holds: an 8-bit sRGB JPEG.

A JPEG that needs no change (baseline or progressive, RGB or grey, 8 bit, no colour profile or an
sRGB one, no orientation to apply) is kept: its own compressed data with the metadata segments
removed (`jpeg_markers`), no second lossy pass. Everything else is decoded and re-encoded as
baseline RGB JPEG q95 (a PNG's image data inflated by ISA-L first, `png_inflate`). Kept
progressive files stay progressive; Pillow, hence the trainer, the captioner and kohya, read them.

Whether bytes are an image is decided by decoding them with a fixed list of Pillow formats;
the pixel count is read from the header and checked before any pixel is decoded. Colours tagged
with an ICC profile (Display P3 phone photos, Adobe RGB, CMYK prints) are converted to sRGB, since
the stored JPEG carries no profile and every model and viewer reads untagged pixels as sRGB.

The bound is FLUXTRAIN_MAX_IMAGE_PIXELS, checked by every caller of `open_image`. Pillow's own,
process-wide guard (Image.MAX_IMAGE_PIXELS: a warning above ~89 MP, an error above twice that)
would contradict it, so it is lifted once here, at import, rather than toggled around each open,
which other threads would see.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal

import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from fluxtrain.datasets.jpeg_markers import strip_metadata
from fluxtrain.datasets.png_inflate import SIGNATURE as PNG_SIGNATURE
from fluxtrain.datasets.png_inflate import chunk_count, repacked

pillow_heif.register_heif_opener()
Image.MAX_IMAGE_PIXELS = None

ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "HEIF", "AVIF")
JPEG_QUALITY = 95
JPEG_MAX_SIDE = 65500  # libjpeg's limit: a wider or taller image cannot be stored as a JPEG
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255)
# Modes whose colours an embedded ICC profile describes (alpha is split off first).
_PROFILE_MODES = frozenset({"RGB", "CMYK", "L"})
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_KEPT_MODES = frozenset({"RGB", "L"})
_KEPT_FORMATS = ("JPEG",)
# A profile counts as sRGB when converting through it moves no probe colour by more than this.
_SRGB_TOLERANCE = 2
_ORIENTATION = 0x0112
# Every scan of a progressive JPEG is a pass over every block: a small file of thousands of empty
# scans costs seconds to decode (2,000 added to a 4096 px file: 2.1 s instead of 0.27 s). Encoders
# write 10 or so; 256 is generous.
# The decode path counts SOS markers in the raw bytes, metadata included (an EXIF thumbnail adds
# its own); a kept file's are counted by the walk that strips it, and one over the bound goes to
# the decode path, which refuses it.
MAX_JPEG_SCANS = 256
_SOS = b"\xff\xda"
# Pillow reads a JPEG up to its first scan in Python, one step per segment and one per fill, junk
# or stuffed byte between segments: about 0.25 s per megabyte of empty comments, so a 50 MB body of
# them would hold a worker for 12 s. Encoders write tens of segments.
MAX_JPEG_HEADER_STEPS = 1024
# Markers after which Pillow reads no length (SOI, EOI, RSTn, JPG, JPGn); any other from 0xFFC0 on
# has a handler that reads one. 0xFFFF is a fill byte, 0xFF00 a stuffed one.
_LENGTHLESS_MARKERS = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
# The same for a PNG's chunks, which Pillow reads one Python call each (about 2 us: 4 million
# empty ones fit in 50 MB). An encoder writing 8 KB of image data per chunk stays far below.
MAX_PNG_CHUNKS = 1 << 16
# And for a GIF's blocks before its first image, which Pillow also walks in Python, one step per
# extension, per sub-block and per junk byte between blocks (0.2-0.5 us each): a 50 MB body of
# 1-byte comments held a worker 5 s. A 16 MB application extension in 255-byte sub-blocks fits.
MAX_GIF_STEPS = 1 << 16
_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
_GIF_COMMENT = 0xFE
_GIF_APPLICATION = 0xFF
_NETSCAPE = b"NETSCAPE2.0"

Stored = Literal["kept", "reencoded"]


class ImageRejectedError(Exception):
    """The bytes are not an image we accept; the message is the short reason shown to the user."""


@dataclass(frozen=True)
class NormalizedImage:
    jpeg: bytes
    width: int
    height: int
    stored: Stored = "reencoded"


def _looks_like_markup(data: bytes) -> bool:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<")


def open_image(
    source: Path | BinaryIO, *, max_pixels: int, formats: tuple[str, ...] = ACCEPTED_FORMATS
) -> Image.Image:
    """Open lazily and refuse more than `max_pixels` by the header, before any pixel is decoded."""
    image = Image.open(source, formats=formats)
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageRejectedError(
            f"decompression bomb: {width}x{height} is {width * height} pixels, the limit is {max_pixels}"
        )
    return image


def _too_many_scans(data: bytes) -> bool:
    return data.startswith(b"\xff\xd8") and data.count(_SOS) > MAX_JPEG_SCANS


def _pillow_header_steps(data: bytes, limit: int) -> int:
    """How many steps Pillow's JPEG header parser (JpegImagePlugin `_open`) takes on `data` before
    the first scan, counting no further than `limit` + 1. It mirrors that loop step for step: a
    segment is one step, and so is each byte it moves over one at a time (fill, stuffed, junk)."""
    position, size, steps = 3, len(data), 0
    current = 0xFF
    while steps <= limit:
        steps += 1
        if current != 0xFF or position >= size:
            if position >= size:
                break
            current, position = data[position], position + 1
            continue
        marker, position = data[position], position + 1
        if marker >= 0xC0 and marker != 0xFF:
            if marker not in _LENGTHLESS_MARKERS:
                if position + 2 > size:
                    break
                position += 2 + max(int.from_bytes(data[position : position + 2], "big") - 2, 0)
            if marker == 0xDA or position >= size:
                break
            current, position = data[position], position + 1
        elif marker == 0x00:
            if position >= size:
                break
            current, position = data[position], position + 1
        elif marker != 0xFF:
            break
    return steps


def _too_many_header_steps(data: bytes) -> bool:
    return (
        data.startswith(b"\xff\xd8")
        and _pillow_header_steps(data, MAX_JPEG_HEADER_STEPS) > MAX_JPEG_HEADER_STEPS
    )


def _gif_header_steps(data: bytes, limit: int) -> int:
    """How many steps Pillow's GIF parser (GifImagePlugin `_seek(0)`) takes on `data` before the
    first image, counting no further than `limit` + 1. It mirrors that loop: a byte between blocks
    is one step, an extension one, and each sub-block it reads one. A comment's sub-blocks end at
    the first empty one; any other extension's first sub-block (and a NETSCAPE2.0 one's second) is
    read whatever it holds, then sub-blocks until an empty one, so an empty first one does not end
    the extension."""
    size = len(data)
    flags = data[10] if size > 10 else 0
    position = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    steps = 0

    def sub_block() -> int:
        nonlocal position, steps
        steps += 1
        length = data[position] if position < size else 0
        position += 1 + length
        return length

    while position < size and steps <= limit:
        introducer = data[position]
        position += 1
        steps += 1
        if introducer in (0x2C, 0x3B):
            break
        if introducer != 0x21:
            continue
        label = data[position] if position < size else 0
        position += 1
        first_at = position + 1
        first = sub_block()
        if label == _GIF_COMMENT and not first:
            continue
        if label == _GIF_APPLICATION and first and data[first_at : first_at + 11] == _NETSCAPE:
            sub_block()
        while sub_block() and position < size and steps <= limit:
            pass
    return steps


def _too_many_gif_steps(data: bytes) -> bool:
    return data[:6] in _GIF_SIGNATURES and _gif_header_steps(data, MAX_GIF_STEPS) > MAX_GIF_STEPS


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejectedError("not an image: the body is empty")
    if _looks_like_markup(data):
        raise ImageRejectedError("not an image: looks like SVG, HTML or XML (refused)")
    if _too_many_scans(data):
        raise ImageRejectedError(f"decompression bomb: a JPEG of more than {MAX_JPEG_SCANS} scans")
    if _too_many_header_steps(data):
        raise ImageRejectedError(
            f"refused: a JPEG of more than {MAX_JPEG_HEADER_STEPS} segments, fill or junk bytes "
            "before its image data"
        )
    if data.startswith(PNG_SIGNATURE) and chunk_count(data, MAX_PNG_CHUNKS) > MAX_PNG_CHUNKS:
        raise ImageRejectedError(f"refused: a PNG of more than {MAX_PNG_CHUNKS} chunks")
    if _too_many_gif_steps(data):
        raise ImageRejectedError(
            f"refused: a GIF of more than {MAX_GIF_STEPS} blocks, sub-blocks or junk bytes before its "
            "first image"
        )
    try:
        return open_image(io.BytesIO(data), max_pixels=max_pixels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejectedError("not an image: could not be decoded as an accepted format") from exc


def _load_first_frame(image: Image.Image) -> Image.Image:
    try:
        image.seek(0)
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejectedError(f"truncated or corrupt image: {exc}") from exc
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and floating-point grey as 8-bit grey; other modes as they are.

    Float images from scientific and HDR tools usually hold 0..1, others 0..255: one whose largest
    value is at most 1.0 is scaled by 255. Pillow's conversion to "L" clips what lies outside 0..255.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode == "F":
        _, high = image.getextrema()
        return (image.point(lambda value: value * 255) if high <= 1.0 else image).convert("L")
    return image


def _split_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour channels and the alpha apart; a transparency key (PNG tRNS) counts as alpha."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        grey = image.mode in ("L", "LA", "La")
        return rgba.convert("L" if grey else "RGB"), rgba.getchannel("A")
    if image.mode in _PROFILE_MODES:
        return image, None
    return image.convert("RGB"), None


def _to_srgb(colour: Image.Image, icc: bytes | None) -> Image.Image:
    """RGB through the embedded profile; a profile that is unreadable or does not fit is ignored."""
    if icc and colour.mode in _PROFILE_MODES:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(colour, source, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return colour if colour.mode == "RGB" else colour.convert("RGB")


def _to_rgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """sRGB pixels, anything transparent composited on white."""
    colour, alpha = _split_alpha(_eight_bit(image))
    rgb = _to_srgb(colour, icc)
    if alpha is None:
        return rgb
    background = Image.new("RGB", rgb.size, _WHITE)
    background.paste(rgb, mask=alpha)
    return background


@lru_cache(maxsize=32)
def _is_srgb(icc: bytes) -> bool:
    """Whether converting through this profile to sRGB leaves colours where they are."""
    levels = (0, 51, 102, 153, 204, 255)
    probe = Image.new("RGB", (len(levels) ** 3, 1))
    probe.putdata([(r, g, b) for r in levels for g in levels for b in levels])
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if source.profile.xcolor_space.strip() != "RGB":
            return False
        converted = ImageCms.profileToProfile(probe, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return False
    return all(
        abs(a - b) <= _SRGB_TOLERANCE
        for before, after in zip(probe.getdata(), converted.getdata(), strict=True)
        for a, b in zip(before, after, strict=True)
    )


def _needs_no_change(image: Image.Image) -> bool:
    """What today's decode path would leave as it is: RGB or grey, upright, sRGB or untagged."""
    if image.format not in ("JPEG", "MPO") or image.mode not in _KEPT_MODES:
        return False
    if image.getexif().get(_ORIENTATION, 1) != 1:
        return False
    icc = image.info.get("icc_profile")
    return not icc or (image.mode == "RGB" and _is_srgb(icc))


def _tags_need_no_change(data: bytes, max_pixels: int) -> bool:
    """Whether the application segments of `data` that `strip_metadata` drops ask for nothing (no
    orientation to apply, no profile but sRGB) and Pillow reads them without trouble."""
    with open_image(io.BytesIO(data), max_pixels=max_pixels, formats=_KEPT_FORMATS) as image:
        return _needs_no_change(image)


def _kept_jpeg(data: bytes, max_pixels: int) -> NormalizedImage | None:
    """`data` stripped of metadata when it needs no change and decodes whole; None otherwise.

    Only a file with application segments to drop (`Stripped.tagged`: EXIF, XMP, ICC, IPTC, ...)
    is opened as it came, to read what they ask for; the rest is judged on its stripped form, whose
    frame, JFIF and Adobe segments are the original's. "Decodes whole" is checked at 1/8 scale, in
    grey, where libjpeg still reads every table and scan header but skips the full-size inverse
    DCT and colour conversion. A baseline file is checked on its skeleton (`Stripped`): the
    sequential decoder refuses nothing inside the entropy data, so that takes 0.15 ms at 512 px
    instead of 0.6 ms. A progressive file is decoded whole at 1/8 scale, since the progressive
    decoder does refuse some entropy data (a DC value that overflows). Its scans are counted by the
    walk that strips it, not by a search of the raw bytes (a third of this check's time at 50 KB),
    so bytes that only look like scan markers in a comment or after the end no longer count. Any
    trouble at all (a hostile header, a bad segment length, a truncated scan, too many scans) is
    answered with None, and the decode path decides about those bytes.
    """
    if not data.startswith(b"\xff\xd8") or _too_many_header_steps(data):
        return None
    try:
        stripped = strip_metadata(data)
        if stripped.scans > MAX_JPEG_SCANS:
            return None
        if stripped.tagged and not _tags_need_no_change(data, max_pixels):
            return None
        probe = stripped.jpeg if stripped.progressive else stripped.skeleton
        with open_image(io.BytesIO(probe), max_pixels=max_pixels, formats=_KEPT_FORMATS) as clean:
            if not _needs_no_change(clean):
                return None
            width, height = clean.size
            clean.draft("L", (max(1, width // 8), max(1, height // 8)))
            clean.load()
            return NormalizedImage(jpeg=stripped.jpeg, width=width, height=height, stored="kept")
    except Exception:
        return None


def normalize_image(data: bytes, *, max_pixels: int) -> NormalizedImage:
    """The kept JPEG when `data` needs no change, otherwise `reencode_image`'s output."""
    return _kept_jpeg(data, max_pixels) or reencode_image(data, max_pixels=max_pixels)


def reencode_image(data: bytes, *, max_pixels: int) -> NormalizedImage:
    """Decode `data` and re-encode it as sRGB baseline JPEG q95, orientation applied, metadata dropped."""
    with _open(data, max_pixels) as image:
        if max(image.size) > JPEG_MAX_SIDE:
            raise ImageRejectedError(
                f"refused: {image.width}x{image.height} px; a JPEG holds at most {JPEG_MAX_SIDE} px a side"
            )
        fast = repacked(data) if image.format == "PNG" else None
        if fast is None:
            return _reencoded(image)
    with _open(fast, max_pixels) as image:
        return _reencoded(image)


def _reencoded(image: Image.Image) -> NormalizedImage:
    frame = _load_first_frame(image)
    icc = frame.info.get("icc_profile")
    try:
        turned = frame.getexif().get(_ORIENTATION, 1) != 1
        upright = ImageOps.exif_transpose(frame) if turned else frame
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        upright = frame
    try:
        rgb = _to_rgb(upright, icc)
    except (OSError, ValueError) as exc:
        raise ImageRejectedError(f"unsupported image mode {upright.mode}: {exc}") from exc
    out = io.BytesIO()
    # No comment either: Pillow would copy the source's (a GIF or JPEG comment, a PNG text chunk
    # called "comment") into the JPEG, and fail on one over 64 KB.
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, comment=b"")
    return NormalizedImage(jpeg=out.getvalue(), width=rgb.width, height=rgb.height)
