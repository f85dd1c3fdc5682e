"""A PNG's image data inflated by ISA-L, handed to Pillow as stored (uncompressed) deflate blocks.

Inflating IDAT is most of a PNG's decode time (2.6 of 3.2 ms for a 512x512 photo, in zlib);
Intel's ISA-L inflates the same stream in about half that. Pillow cannot take another inflater,
but it takes any valid zlib stream: the same filtered scanlines in stored blocks cost it a copy
and a checksum, so Pillow still does everything else (unfiltering, palettes, transparency, text
and eXIf chunks, APNG frames) exactly as before and the pixels are the same by construction.

Only the common case is repacked: 8-bit, not interlaced, at most MAX_CHUNKS chunks in all, the
image data in consecutive IDAT chunks holding one zlib stream (a header zlib accepts, its Adler-32
checked at its end) that inflates to exactly the size IHDR implies, at most MAX_RAW_BYTES.
Anything else (and anything malformed) is answered with None, so Pillow decides about the
original bytes as it always has. One difference remains: ISA-L decodes a deflate block whose
Huffman code is incomplete, which zlib refuses; the stream's checksum must still match, so such a
(hand-made) file gives exactly the pixels its encoder checksummed, where Pillow would have refused
it. The repacked copy lives next to the decoded image, so a repacked PNG costs up to
2 x MAX_RAW_BYTES more memory than Pillow alone. Callers check the pixel bound on the header first.
"""

from __future__ import annotations

import struct

from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_RAW_BYTES = 64 * 1024 * 1024
MAX_CHUNKS = 1 << 15
_CHUNK_HEAD = struct.Struct(">I4s")
_IHDR = struct.Struct(">IIBBBBB")
_CRC = struct.Struct(">I")
_STORED_HEAD = struct.Struct("<BHH")
_STORED_MAX = 0xFFFF
# Bytes per pixel at bit depth 8, by PNG colour type (grey, RGB, palette, grey+alpha, RGBA).
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# The two-byte zlib header of a stream with no preset dictionary and a 32 KiB window.
_ZLIB_HEAD = b"\x78\x01"


def _raw_size(data: bytes) -> int | None:
    """The filtered scanlines' size IHDR implies, or None when this module does not repack it."""
    if len(data) < 33 or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour, _compression, _filter, interlace = _IHDR.unpack_from(data, 16)
    channels = _CHANNELS.get(colour)
    if depth != 8 or interlace != 0 or channels is None or not width or not height:
        return None
    size = height * (1 + width * channels)
    return size if size <= MAX_RAW_BYTES else None


def _chunks(data: bytes) -> tuple[list[memoryview], list[memoryview], list[memoryview]] | None:
    """The chunks before the image data, the IDAT payloads, the chunks after (IEND included)."""
    view = memoryview(data)
    before: list[memoryview] = [view[: len(SIGNATURE)]]
    payloads: list[memoryview] = []
    after: list[memoryview] = []
    position = len(SIGNATURE)
    for _ in range(MAX_CHUNKS):
        if position + _CHUNK_HEAD.size > len(data):
            break
        length, kind = _CHUNK_HEAD.unpack_from(data, position)
        end = position + _CHUNK_HEAD.size + length + _CRC.size
        if end > len(data):
            return None
        if kind == b"IDAT":
            if after:
                return None
            payloads.append(view[position + _CHUNK_HEAD.size : end - _CRC.size])
        else:
            (after if payloads else before).append(view[position:end])
        position = end
        if kind == b"IEND":
            break
    else:
        return None
    return (before, payloads, after) if payloads else None


def _zlib_header_ok(stream: bytes) -> bool:
    """Deflate with a window of at most 32 KiB, a valid check value, no preset dictionary: the
    headers zlib accepts (ISA-L also takes a larger window)."""
    if len(stream) < 2:
        return False
    method, flags = stream[0], stream[1]
    return method & 0x0F == 8 and method >> 4 <= 7 and (method << 8 | flags) % 31 == 0 and not flags & 0x20


def _inflate(payloads: list[memoryview], size: int) -> bytes | None:
    """The scanlines, or None unless the stream ends, checksum verified, after exactly `size` bytes."""
    stream = b"".join(payloads)
    if not _zlib_header_ok(stream):
        return None
    inflater = isal_zlib.decompressobj()
    raw = inflater.decompress(stream, size + 1)
    return raw if len(raw) == size and inflater.eof else None


def _stored_idat(raw: bytes) -> list[bytes | memoryview]:
    """One IDAT chunk holding `raw` as a zlib stream of stored blocks, as parts to join."""
    view = memoryview(raw)
    body: list[bytes | memoryview] = [_ZLIB_HEAD]
    for start in range(0, len(raw), _STORED_MAX):
        block = view[start : start + _STORED_MAX]
        final = start + _STORED_MAX >= len(raw)
        body += [_STORED_HEAD.pack(final, len(block), _STORED_MAX ^ len(block)), block]
    body.append(_CRC.pack(isal_zlib.adler32(raw)))
    length = sum(len(part) for part in body)
    crc = isal_zlib.crc32(b"IDAT")
    for part in body:
        crc = isal_zlib.crc32(part, crc)
    return [_CHUNK_HEAD.pack(length, b"IDAT"), *body, _CRC.pack(crc)]


def repacked(data: bytes) -> bytes | None:
    """`data` with its image data inflated by ISA-L into stored blocks, or None (see the module)."""
    size = _raw_size(data)
    if size is None:
        return None
    parts = _chunks(data)
    if parts is None:
        return None
    before, payloads, after = parts
    try:
        raw = _inflate(payloads, size)
    except isal_zlib.error:
        return None
    if raw is None:
        return None
    return b"".join([*before, *_stored_idat(raw), *after])


def chunk_count(data: bytes, limit: int) -> int:
    """How many chunks `data` (a PNG) holds, counting no further than `limit` + 1; the count so far
    where the structure breaks off (the decoder judges that).

    Pillow reads every chunk, image data included, with a Python call of its own."""
    position, count, size = len(SIGNATURE), 0, len(data)
    while count <= limit and position + _CHUNK_HEAD.size <= size:
        length, kind = _CHUNK_HEAD.unpack_from(data, position)
        count += 1
        if kind == b"IEND":
            break
        position += _CHUNK_HEAD.size + length + _CRC.size
    return count
