"""Byte-level edits of image containers, so that metadata can never make pixels unreadable.

Pillow parses metadata while it opens an image, and refuses the whole image when that
parsing fails: a PNG text chunk that decompresses past its 1 MB safety limit, a JPEG ICC
segment shorter than its header, a malformed MPF (MPO) directory, a PNG pHYs chunk cut
short. None of that metadata changes a pixel the model sees (no colour management is
applied; the EXIF orientation is read separately and ignored when unreadable), so the
decoder can drop it:

- `png_without_text` drops PNG text and ICC chunks before Pillow sees them: they are
  never needed, and never decompressing them also bounds their memory.
- `png_pixels_only` and `jpeg_pixels_only` keep only what decoding needs. The decoder
  uses them for a second try when the first one failed, so that an image broken only in
  its metadata is still read, while one broken in its pixel data fails both times.

References: PNG (ISO/IEC 15948, 3rd edition, section 5: chunk layout, critical and
ancillary chunks); JPEG (ITU-T T.81, annex B: marker segments; JFIF APP0, EXIF APP1, ICC
APP2, Adobe APP14).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"

# Chunks that carry only text or a colour profile; Pillow decompresses them on opening.
_PNG_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt", b"iCCP"})
# Chunks that decoding the pixels needs: header, palette, transparency, data, end, and
# the APNG control chunks (frame 0 is what the service reads).
_PNG_PIXELS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"acTL", b"fcTL", b"fdAT"})


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end) of each whole chunk after the signature, until the bytes stop
    making sense (a truncated file): the rest is then yielded as one chunk of type b""."""
    position = len(PNG_SIGNATURE)
    while position < len(data):
        end = position + 12
        if end <= len(data):
            (length,) = struct.unpack_from(">I", data, position)
            end += length
        if end > len(data):
            yield b"", position, len(data)
            return
        yield data[position + 4 : position + 8], position, end
        position = end


def _filter_png(data: bytes, keep: Callable[[bytes], bool]) -> bytes:
    parts = [PNG_SIGNATURE]
    changed = False
    for kind, start, end in _png_chunks(data):
        if kind == b"" or keep(kind):
            parts.append(data[start:end])
        else:
            changed = True
    return b"".join(parts) if changed else data


def png_without_text(data: bytes) -> bytes:
    """The PNG without its tEXt, zTXt, iTXt and iCCP chunks (`data` itself if it has none)."""
    return _filter_png(data, lambda kind: kind not in _PNG_TEXT)


def png_pixels_only(data: bytes) -> bytes:
    """The PNG with only the chunks its pixels need (`data` itself if that is all it has)."""
    return _filter_png(data, lambda kind: kind in _PNG_PIXELS)


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment from SOI up to the first SOS; the first
    SOS and everything after it (the scans) come as one final segment, as does the rest
    of a file that stops making sense."""
    position = len(JPEG_SOI)
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0xDA:  # SOS: the entropy-coded data follows
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        end = position + 2 + length
        if length < 2 or end > len(data):
            break
        yield marker, position, end
        position = end
    yield -1, position, len(data)


def jpeg_pixels_only(data: bytes) -> bytes:
    """The JPEG without its metadata segments: APP0 to APP15 and COM, except an EXIF APP1
    (its orientation is still wanted; Pillow only reads it lazily) and a whole Adobe APP14
    (its transform flag says how to read the colour channels). `data` itself if unchanged."""
    parts = [JPEG_SOI]
    changed = False
    for marker, start, end in _jpeg_segments(data):
        segment = data[start:end]
        payload = segment[4:]
        metadata = 0xE0 <= marker <= 0xEF or marker == 0xFE
        wanted = (marker == 0xE1 and payload.startswith(b"Exif\0\0")) or (
            marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12
        )
        if metadata and not wanted:
            changed = True
        else:
            parts.append(segment)
    return b"".join(parts) if changed else data


JPEG_EOI = b"\xff\xd9"
# Start-of-frame markers (T.81 table B.1), and those of progressive frames among them.
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)})
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _after_scan(data: bytes, position: int) -> int | None:
    """Where the entropy-coded data starting at `position` ends (the next marker), or None
    when the bytes end first. 0xFF00 is a stuffed byte and 0xFFD0-D7 restart markers."""
    while (found := data.find(b"\xff", position)) != -1 and found + 1 < len(data):
        following = data[found + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            position = found + (1 if following == 0xFF else 2)
            continue
        return found
    return None


def jpeg_scans_cover_the_image(data: bytes) -> bool:
    """Whether the scans present (their headers, T.81 B.2.3) carry every coefficient of
    every component to full precision: each component in some scan of a sequential JPEG;
    for a progressive one, each of the 64 coefficients of each component in a scan whose
    successive approximation bit Al is 0. A JPEG cut between two scans fails this; whether
    the last scan's own data is whole is for the decoder to show."""
    components: list[int] = []
    progressive = False
    scans: list[tuple[set[int], int, int, int]] = []  # (components, Ss, Se, Al)
    position = len(JPEG_SOI)
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        segment = data[position + 4 : position + 2 + length]
        if marker in _SOF and len(segment) >= 6:
            progressive = marker in _PROGRESSIVE
            count = segment[5]
            components = [segment[6 + 3 * i] for i in range(count) if 6 + 3 * i < len(segment)]
        if marker == 0xDA and segment:
            count = segment[0]
            if len(segment) < 4 + 2 * count:
                return False
            ids = {segment[1 + 2 * i] for i in range(count)}
            start, end, approximation = segment[1 + 2 * count : 4 + 2 * count]
            scans.append((ids, start, end, approximation & 0x0F))
            after = _after_scan(data, position + 2 + length)
            if after is None:
                break  # the bytes end inside this scan
            position = after
            continue
        position += 2 + length
    if not components or not scans:
        return False
    if not progressive:
        return set(components) <= set().union(*(ids for ids, *_ in scans))
    return all(
        any(c in ids and start <= k <= end and al == 0 for ids, start, end, al in scans)
        for c in components
        for k in range(64)
    )
