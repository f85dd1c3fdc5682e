"""Removing metadata from a JPEG at the marker level, the compressed image data copied verbatim.

No well-kept Python library does exactly this: piexif removes only the EXIF segment, the strippers
on PyPI decode and re-save through Pillow (a second lossy pass), and jpegtran re-codes the entropy
data. The JPEG syntax needed is small, so it is walked here with an allow-list:

- kept: SOI, SOF0 (baseline) and SOF2 (progressive) at 8-bit precision, DQT, DHT, DRI, every SOS
  with its entropy-coded data (restart markers included), EOI; APP0 "JFIF" (its optional thumbnail
  cut off) and APP14 "Adobe", whose transform flag tells a decoder whether three channels are
  YCbCr or RGB, so removing it could change the colours;
- removed: every other APPn (APP1 EXIF and XMP with GPS, APP2 ICC and MPF, APP13 IPTC, ...) and
  COM, and whatever follows the first EOI (MPF's appended pictures, trailing junk);
- anything else (arithmetic coding, lossless or hierarchical frames, 12-bit, DNL, a length that
  runs past the end, a missing EOI) raises MalformedJpegError, and the caller decodes instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOI = 0xD8
EOI = 0xD9
SOS = 0xDA
_PROGRESSIVE = 0xC2
_FRAMES = frozenset({0xC0, _PROGRESSIVE})
_TABLES = frozenset({0xC4, 0xDB, 0xDD})
_APP0 = 0xE0
_APP14 = 0xEE
_COM = 0xFE
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_FILL = re.compile(rb"\xff+")  # a marker's 0xFF and the fill bytes before it
_JFIF_HEADER_LENGTH = 14  # "JFIF\0", version, units, densities, thumbnail width and height
# Encoders write tens of segments (a few hundred for a progressive file with an extended XMP) and
# hardly any fill bytes; a 50 MB body of empty comments holds 12 million segments, which this walk
# would take 6 s over. Past MAX_STEPS segments and fill bytes it gives up.
MAX_STEPS = 4096


class MalformedJpegError(ValueError):
    """The bytes are not a JPEG this module can rewrite safely."""


def _jfif_without_thumbnail(payload: bytes) -> bytes:
    if len(payload) < _JFIF_HEADER_LENGTH:
        raise MalformedJpegError("JFIF segment too short")
    header = payload[: _JFIF_HEADER_LENGTH - 2] + b"\0\0"
    return b"\xff\xe0" + (len(header) + 2).to_bytes(2, "big") + header


def _entropy_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data that starts at `start` ends: at the next 0xFF that is neither
    a stuffed 0xFF00 nor a restart marker (one regular-expression search, not a loop per 0xFF)."""
    found = _MARKER_IN_SCAN.search(data, start)
    if found is None:
        raise MalformedJpegError("scan data runs past the end")
    return found.start()


@dataclass(frozen=True)
class Stripped:
    """What `strip_metadata` makes of a JPEG, in one walk over its bytes.

    `jpeg`: only the segments a decoder needs, every scan's entropy-coded data byte for byte.
    `skeleton`: the same segments with the entropy-coded data left out. What libjpeg's sequential
    (baseline) decoder refuses outright (missing or bogus tables, impossible scan parameters, frame
    and component mismatches) it refuses while reading these segments, before any coefficient;
    damage inside the entropy data it only warns about and decodes around. So for a baseline file,
    decoding the skeleton fails exactly when decoding the whole file fails, at a fraction of the
    cost: on 5,620 randomly damaged files of every kept form, 710 of which a full decode refuses,
    the two never disagreed (tests/datasets/test_kept_jpeg.py repeats 600 of them). The
    progressive decoder also refuses some entropy data (a DC value that overflows), so its files
    need the whole decode.
    `scans`: how many scans `jpeg` holds, so a caller can bound the decode's passes.
    `progressive`: whether the frame is progressive (SOF2).
    `tagged`: whether `data` held an application segment that `jpeg` leaves out (EXIF and XMP, which
    can ask for a rotation; ICC, for a colour conversion; MPF, IPTC, ...): the segments a reader
    such as Pillow reads meaning into, or stumbles on. The JFIF and Adobe segments stay.
    """

    jpeg: bytes
    skeleton: bytes
    scans: int
    progressive: bool
    tagged: bool


def strip_metadata(data: bytes) -> Stripped:
    """`data` with only the segments a decoder needs, and its skeleton; see the module and `Stripped`."""
    if data[:2] != b"\xff\xd8":
        raise MalformedJpegError("no SOI marker")
    out = [b"\xff\xd8"]
    skeleton = [b"\xff\xd8"]
    position = 2
    frame_seen = progressive = tagged = False
    scans = steps = 0
    size = len(data)
    while True:
        run = _FILL.match(data, position) if position + 2 <= size else None
        if run is None:
            raise MalformedJpegError(f"no marker at offset {position}")
        position = run.end() - 1
        steps += run.end() - run.start()
        if steps > MAX_STEPS:
            raise MalformedJpegError(f"more than {MAX_STEPS} segments and fill bytes")
        if position + 2 > size:
            raise MalformedJpegError("ends inside a marker")
        marker = data[position + 1]
        if marker == EOI:
            if not frame_seen or scans == 0:
                raise MalformedJpegError("EOI before any frame or scan")
            out.append(b"\xff\xd9")
            skeleton.append(b"\xff\xd9")
            return Stripped(
                jpeg=b"".join(out),
                skeleton=b"".join(skeleton),
                scans=scans,
                progressive=progressive,
                tagged=tagged,
            )
        if position + 4 > size:
            raise MalformedJpegError("ends inside a segment length")
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        end = position + 2 + length
        if length < 2 or end > size:
            raise MalformedJpegError(f"segment length {length} at offset {position} does not fit")
        segment = data[position:end]
        payload = segment[4:]
        kept: bytes | None = None
        if marker in _FRAMES:
            if frame_seen or not payload or payload[0] != 8:
                raise MalformedJpegError("a second frame or a precision other than 8 bits")
            frame_seen, progressive = True, marker == _PROGRESSIVE
            kept = segment
        elif marker in _TABLES:
            kept = segment
        elif marker == SOS:
            if not frame_seen:
                raise MalformedJpegError("scan before the frame header")
            scan_end = _entropy_end(data, end)
            out.append(data[position:scan_end])
            skeleton.append(segment)
            scans += 1
            end = scan_end
        elif marker == _APP0 and payload.startswith(b"JFIF\0"):
            kept = _jfif_without_thumbnail(payload)
        elif marker == _APP14 and payload.startswith(b"Adobe"):
            kept = segment
        elif 0xE0 <= marker <= 0xEF:
            tagged = True
        elif marker != _COM:
            raise MalformedJpegError(f"unsupported marker 0xFF{marker:02X}")
        if kept is not None:
            out.append(kept)
            skeleton.append(kept)
        position = end
