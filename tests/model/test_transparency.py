"""Transparency in every form is composited over white (issue 14, kind 2).

Every file here is written byte by byte (PNG chunks, a TIFF tag) and every expected pixel
is worked out by hand in the comments: out = round((c * a + 255 * (255 - a)) / 255) for
straight alpha, c' + 255 - a for premultiplied alpha, white where a colour key matches.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.preprocessing import image_to_tensor, to_rgb

WHITE = (255, 255, 255)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png(
    rows: Sequence[Sequence[int]] | Sequence[Sequence[tuple[int, ...]]],
    *,
    depth: int,
    colour_type: int,
    trns: bytes | None = None,
    plte: bytes | None = None,
) -> bytes:
    """A PNG from sample values (one int per grey pixel, a tuple per colour pixel),
    packed at `depth` bits, no filtering; tRNS and PLTE as given."""
    lines = []
    for row in rows:
        samples = [v for pixel in row for v in (pixel if isinstance(pixel, tuple) else (pixel,))]
        if depth == 16:
            line = struct.pack(f">{len(samples)}H", *samples)
        elif depth == 8:
            line = bytes(samples)
        else:
            bits = "".join(format(v, f"0{depth}b") for v in samples)
            bits += "0" * (-len(bits) % 8)
            line = int(bits, 2).to_bytes(len(bits) // 8, "big")
        lines.append(b"\x00" + line)
    header = struct.pack(">IIBBBBB", len(rows[0]), len(rows), depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + (_chunk(b"PLTE", plte) if plte is not None else b"")
        + (_chunk(b"tRNS", trns) if trns is not None else b"")
        + _chunk(b"IDAT", zlib.compress(b"".join(lines)))
        + _chunk(b"IEND", b"")
    )


def rgb_of(data: bytes) -> list[tuple[int, int, int]]:
    """to_rgb of the file as opened (not yet loaded, as the service and training do)."""
    image = to_rgb(Image.open(io.BytesIO(data)))
    return [(int(r), int(g), int(b)) for r, g, b in np.asarray(image).reshape(-1, 3)]


def grey(*values: int) -> list[tuple[int, int, int]]:
    return [(v, v, v) for v in values]


CASES = {
    # 8-bit RGB, key (0, 0, 0): only the exact key turns white.
    "rgb8-key": (
        png([[(0, 0, 0), (0, 0, 1), (10, 20, 30)]], depth=8, colour_type=2, trns=b"\0\0\0\0\0\0"),
        [WHITE, (0, 0, 1), (10, 20, 30)],
    ),
    # 16-bit RGB, key (0, 0, 1): matched on all 16 bits. (0, 0, 0) and (0, 0, 257) share the
    # key's high bytes and stay opaque; 8-bit values are the high bytes (0x12, 0x56, 0x9a).
    "rgb16-key": (
        png(
            [[(0, 0, 0), (0, 0, 1), (0x1234, 0x5678, 0x9ABC), (0, 0, 257)]],
            depth=16,
            colour_type=2,
            trns=struct.pack(">HHH", 0, 0, 1),
        ),
        [(0, 0, 0), WHITE, (0x12, 0x56, 0x9A), (0, 0, 1)],
    ),
    # 8-bit grey, key 7.
    "grey8-key": (
        png([[7, 8, 0]], depth=8, colour_type=0, trns=struct.pack(">H", 7)),
        grey(255, 8, 0),
    ),
    # 2-bit grey, key 1 (decoded as 85): samples 0, 1, 2, 3 are 0, white, 170, 255.
    "grey2-key": (
        png([[0, 1, 2, 3]], depth=2, colour_type=0, trns=struct.pack(">H", 1)),
        grey(0, 255, 170, 255),
    ),
    # 4-bit grey, key 5 (decoded as 85): samples 0, 5, 6 are 0, white, 102.
    "grey4-key": (
        png([[0, 5, 6]], depth=4, colour_type=0, trns=struct.pack(">H", 5)),
        grey(0, 255, 102),
    ),
    # 1-bit grey, key 0: black turns white.
    "grey1-key": (png([[0, 1]], depth=1, colour_type=0, trns=struct.pack(">H", 0)), grey(255, 255)),
    # 16-bit grey, key 300: 301 stays opaque, scaled 301 / 65535 * 255 = 1.17 -> 1.
    "grey16-key": (
        png([[300, 301, 65535, 0]], depth=16, colour_type=0, trns=struct.pack(">H", 300)),
        grey(255, 1, 255, 0),
    ),
    # Palette with a tRNS alpha table: entry 0 alpha 0, entry 1 (200, 100, 50) alpha 128:
    # (200 * 128 + 255 * 127) / 255 = 227.4 -> 227; 100 -> 177.2 -> 177; 50 -> 152.1 -> 152.
    "palette-alpha": (
        png(
            [[0, 1, 2]],
            depth=8,
            colour_type=3,
            plte=bytes([10, 20, 30, 200, 100, 50, 7, 8, 9]),
            trns=bytes([0, 128]),  # entry 2 has no alpha: opaque
        ),
        [WHITE, (227, 177, 152), (7, 8, 9)],
    ),
    # Palette at 4 bits with one transparent entry (Pillow reads it as a single index).
    "palette4-index": (
        png(
            [[0, 1]], depth=4, colour_type=3, plte=bytes([10, 20, 30, 40, 50, 60]), trns=b"\xff\x00"
        ),
        [(10, 20, 30), WHITE],
    ),
    # Grey + alpha: (100, a 64): (100 * 64 + 255 * 191) / 255 = 216.1 -> 216.
    "grey-alpha8": (png([[(100, 64), (100, 0)]], depth=8, colour_type=4), grey(216, 255)),
    # RGBA: (200, 100, 50, 128) -> (227, 177, 152) as above; alpha 255 unchanged.
    "rgba8": (
        png([[(200, 100, 50, 128), (1, 2, 3, 255)]], depth=8, colour_type=6),
        [(227, 177, 152), (1, 2, 3)],
    ),
    # 16-bit RGBA is composited at 8 bits (high bytes): (0xC8xx, ..., alpha 0x80xx).
    "rgba16": (
        png([[(0xC812, 0x6434, 0x3256, 0x8078)]], depth=16, colour_type=6),
        [(227, 177, 152)],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_png_transparency_is_composited_over_white(name: str) -> None:
    data, expected = CASES[name]
    assert rgb_of(data) == expected


def _tiff_with_associated_alpha(pixel: tuple[int, int, int, int]) -> bytes:
    """A 2x1 TIFF whose ExtraSamples tag (338) says 1, associated (premultiplied) alpha."""
    buffer = io.BytesIO()
    Image.new("RGBA", (2, 1), pixel).save(buffer, "TIFF")
    unassociated = struct.pack("<HHII", 338, 3, 1, 2)  # tag, SHORT, count 1, value 2
    data = buffer.getvalue()
    assert data.count(unassociated) == 1
    return data.replace(unassociated, struct.pack("<HHII", 338, 3, 1, 1))


def test_premultiplied_alpha_is_composited_over_white() -> None:
    # Stored premultiplied (100, 50, 25) with alpha 128: 100 + 127, 50 + 127, 25 + 127.
    image = Image.open(io.BytesIO(_tiff_with_associated_alpha((100, 50, 25, 128))))
    assert np.asarray(to_rgb(image)).reshape(-1, 3).tolist() == [[227, 177, 152]] * 2
    # Pillow's own premultiplied modes, built in memory: RGBa and La.
    rgba = Image.frombytes("RGBa", (1, 1), bytes([100, 50, 25, 128]))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[227, 177, 152]]]
    la = Image.frombytes("La", (1, 1), bytes([30, 64]))  # 30 + (255 - 64) = 221
    assert np.asarray(to_rgb(la)).tolist() == [[[221, 221, 221]]]


def test_images_built_in_memory_are_composited_over_white() -> None:
    """An image made in memory (Image.new, fromarray) has no pending decode to read a raw
    mode from; to_rgb once failed on it with AttributeError ('tile')."""
    # (200, 100, 50) at alpha 128 -> (227, 177, 152); alpha 0 -> white; 255 unchanged.
    rgba = Image.fromarray(
        np.array([[[200, 100, 50, 128], [9, 9, 9, 0], [1, 2, 3, 255]]], np.uint8), "RGBA"
    )
    assert np.asarray(to_rgb(rgba)).tolist() == [[[227, 177, 152], list(WHITE), [1, 2, 3]]]
    la = Image.new("LA", (1, 1), (100, 64))  # as grey-alpha8 above: 216
    assert np.asarray(to_rgb(la)).tolist() == [[[216, 216, 216]]]
    assert image_to_tensor(Image.new("RGBA", (40, 40), (0, 0, 0, 0))).unique().tolist() == [255]


def test_palette_plus_alpha_and_gif_transparency() -> None:
    pa = Image.new("PA", (2, 1))
    pa.putpalette([200, 100, 50, 9, 9, 9])
    pa.putpixel((0, 0), (0, 128))
    pa.putpixel((1, 0), (1, 255))
    assert np.asarray(to_rgb(pa)).reshape(-1, 3).tolist() == [[227, 177, 152], [9, 9, 9]]

    gif = Image.new("P", (2, 1))
    gif.putpalette([10, 20, 30, 40, 50, 60])
    gif.putpixel((1, 0), 1)
    buffer = io.BytesIO()
    gif.save(buffer, "GIF", transparency=1)
    assert rgb_of(buffer.getvalue()) == [(10, 20, 30), WHITE]


def test_the_same_picture_keyed_or_with_alpha_gives_the_same_model_input() -> None:
    """The shared case: an RGB PNG with a tRNS key and the same picture as RGBA."""
    cases = Path(__file__).parents[1] / "service" / "cases"
    keyed = image_to_tensor(Image.open(cases / "rgb_trns_black_bg.png"))
    alpha = image_to_tensor(Image.open(cases / "rgb_trns_black_bg_as_rgba.png"))
    assert np.array_equal(keyed.numpy(), alpha.numpy())
    # The background really is keyed out: the corner is white, not black.
    assert keyed[:, 0, 0].tolist() == [255, 255, 255]
