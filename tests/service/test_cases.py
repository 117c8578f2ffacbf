"""The shared cases of issue 14 through the service, and each kind's service-level checks:
transparency (kind 2), metadata (kind 3) and missing trailers (kind 4)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.support.reference import reference_probabilities

CASES = Path(__file__).parent / "cases"


def post(client: TestClient, data: bytes, name: str = "upload") -> tuple[int, dict]:
    response = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
    return response.status_code, response.json()


def probabilities(body: dict) -> list[float]:
    return list(body["probabilities"].values())


def assert_same_answer(client: TestClient, first: bytes, second: bytes) -> dict:
    (status_a, a), (status_b, b) = post(client, first), post(client, second)
    assert (status_a, status_b) == (200, 200), (a, b)
    assert a["label"] == b["label"]
    np.testing.assert_allclose(probabilities(a), probabilities(b), rtol=1e-5, atol=1e-7)
    return a


# --- kind 2: transparency ---------------------------------------------------------------


def test_rgb_with_a_colour_key_answers_like_the_same_picture_with_alpha(
    client: TestClient,
) -> None:
    assert_same_answer(
        client,
        (CASES / "rgb_trns_black_bg.png").read_bytes(),
        (CASES / "rgb_trns_black_bg_as_rgba.png").read_bytes(),
    )


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + crc


def test_a_16_bit_colour_key_is_matched_on_all_16_bits_by_the_service(
    client: TestClient, weights_file: Path
) -> None:
    """40x40, 16-bit RGB: the left half is the key (0, 0, 1), the right half (0, 0, 0),
    which shares the key's high bytes. Expected: white left, black right."""
    row = struct.pack(">3H", 0, 0, 1) * 20 + struct.pack(">3H", 0, 0, 0) * 20
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 16, 2, 0, 0, 0))
        + _chunk(b"tRNS", struct.pack(">3H", 0, 0, 1))
        + _chunk(b"IDAT", zlib.compress((b"\x00" + row) * 40))
        + _chunk(b"IEND", b"")
    )
    expected = np.zeros((40, 40, 3), np.uint8)
    expected[:, :20] = 255
    status, body = post(client, data)
    assert status == 200, body
    [reference] = reference_probabilities(weights_file, [Image.fromarray(expected)])
    np.testing.assert_allclose(probabilities(body), reference, rtol=1e-4, atol=1e-6)
    assert body["image"]["mode"] == "RGB"


# --- kind 3: metadata never makes a valid image unreadable ------------------------------


def _png_with(extra: bytes, *, after_idat: bytes = b"") -> tuple[bytes, bytes]:
    """A 36x30 noise PNG with `extra` chunks before its IDAT (and `after_idat` after it),
    and the same PNG without them."""
    rgb = np.random.default_rng(5).integers(0, 256, (30, 36, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    plain = buffer.getvalue()
    idat = plain.index(b"IDAT") - 4
    iend = plain.index(b"IEND") - 4
    return plain[:idat] + extra + plain[idat:iend] + after_idat + plain[iend:], plain


def _bomb(size: int) -> bytes:
    return zlib.compress(b"\0" * size, 9)


def _png_metadata() -> dict[str, bytes]:
    mb = 1 << 20
    return {
        "iTXt over Pillow's limit": _chunk(b"iTXt", b"Comment\0\x01\0\0\0" + _bomb(2 * mb)),
        "zTXt over Pillow's limit": _chunk(b"zTXt", b"Comment\0\0" + _bomb(2 * mb)),
        "zTXt over Pillow's total": b"".join(
            _chunk(b"zTXt", f"k{i}".encode() + b"\0\0" + _bomb(mb - 100)) for i in range(70)
        ),
        "zTXt with an unknown compression": _chunk(b"zTXt", b"Comment\0\x07abc"),
        "iCCP over Pillow's limit": _chunk(b"iCCP", b"icc\0\0" + _bomb(2 * mb)),
        "iCCP with an unknown compression": _chunk(b"iCCP", b"icc\0\x05abc"),
        "XMP in iTXt, malformed": _chunk(
            b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x tiff:Orientation='9999999999999'"
        ),
        "pHYs cut short": _chunk(b"pHYs", b"\0\0\0"),
        "gAMA cut short": _chunk(b"gAMA", b"\0"),
        "an ancillary chunk with a bad CRC": _chunk(b"tIME", b"\x07\xe6\x01\x01\0\0\0")[:-4]
        + b"\0\0\0\0",
        "eXIf that is not EXIF": _chunk(b"eXIf", b"MM\0*garbage garbage garbage"),
        "eXIf with a bad orientation entry": _chunk(
            b"eXIf", b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x63\0\0\0\0\0\0"
        ),
    }


@pytest.mark.parametrize("name", list(_png_metadata()))
def test_png_metadata_never_makes_the_image_unreadable(client: TestClient, name: str) -> None:
    extra = _png_metadata()[name]
    with_metadata, plain = _png_with(extra)
    assert_same_answer(client, with_metadata, plain)
    after, plain = _png_with(b"", after_idat=extra)  # text after the pixels is read on load
    assert_same_answer(client, after, plain)


def test_the_big_itxt_case_answers_like_its_reference(client: TestClient) -> None:
    assert_same_answer(
        client,
        (CASES / "png_big_itxt.png").read_bytes(),
        (CASES / "png_big_itxt_ref.png").read_bytes(),
    )


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _jpeg_metadata() -> dict[str, bytes]:
    return {
        "ICC segment cut after its name": _segment(0xE2, b"ICC_PROFILE\0"),
        "ICC segments numbered wrongly": _segment(0xE2, b"ICC_PROFILE\0\x05\x02abc"),
        "EXIF that is not EXIF": _segment(0xE1, b"Exif\0\0garbage, not a TIFF header"),
        "EXIF with an IFD pointing nowhere": _segment(0xE1, b"Exif\0\0MM\0*\x7f\xff\xff\xff"),
        "MPF directory that is garbage": _segment(0xE2, b"MPF\0MM\0*\0\0\0\x08\0\x03\xb0\x00"),
        "JFIF cut short": _segment(0xE0, b"JFIF\0"),
        "XMP with a malformed orientation": _segment(
            0xE1, b"http://ns.adobe.com/xap/1.0/\0<x tiff:Orientation='99999999999999999'/>"
        ),
        "Adobe segment cut short": _segment(0xEE, b"Adob"),
        "a 64 kB comment": _segment(0xFE, b"c" * 65000),
        "Photoshop resources cut short": _segment(0xED, b"Photoshop 3.0\x008BIM\x04"),
    }


@pytest.mark.parametrize("name", list(_jpeg_metadata()))
def test_jpeg_metadata_never_makes_the_image_unreadable(client: TestClient, name: str) -> None:
    plain = (CASES / "jpeg_full.jpg").read_bytes()
    with_metadata = plain[:2] + _jpeg_metadata()[name] + plain[2:]
    assert_same_answer(client, with_metadata, plain)


def _tiffs_with_bad_orientation() -> tuple[list[bytes], bytes]:
    """TIFFs whose orientation tag is out of range or points past the end of the file,
    and the same TIFF without it."""
    rgb = Image.fromarray(np.random.default_rng(6).integers(0, 256, (30, 36, 3), dtype=np.uint8))
    plain, tagged = io.BytesIO(), io.BytesIO()
    rgb.save(plain, "TIFF")
    rgb.save(tagged, "TIFF", tiffinfo={274: 1})
    data = tagged.getvalue()
    entry = struct.pack("<HHIHH", 274, 3, 1, 1, 0)  # SHORT, count 1, value 1
    assert data.count(entry) == 1
    broken = [
        data.replace(entry, struct.pack("<HHIHH", 274, 3, 1, 99, 0)),
        data.replace(entry, struct.pack("<HHII", 274, 4, 1000, 0x7FFFFFF0)),
    ]
    return broken, plain.getvalue()


def test_tiff_and_webp_metadata_never_make_the_image_unreadable(client: TestClient) -> None:
    broken, plain = _tiffs_with_bad_orientation()
    for tiff in broken:
        assert_same_answer(client, tiff, plain)
    rgb = Image.fromarray(np.random.default_rng(7).integers(0, 256, (30, 36, 3), dtype=np.uint8))
    webp, bad_webp = io.BytesIO(), io.BytesIO()
    rgb.save(webp, "WEBP", lossless=True)
    rgb.save(bad_webp, "WEBP", lossless=True, exif=b"Exif\0\0garbage", xmp=b"<x tiff:Orientation")
    assert_same_answer(client, bad_webp.getvalue(), webp.getvalue())


def test_decompression_bombs_in_the_pixels_are_still_refused(client: TestClient) -> None:
    """Big text is skipped, but pixels over max_pixels (1e6 in the test app) are not."""
    text = _chunk(b"zTXt", b"Comment\0\0" + _bomb(4 << 20))
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 3000, 3000, 8, 2, 0, 0, 0))
    pixels = _chunk(b"IDAT", _bomb(3000 * (1 + 3 * 3000)))
    bomb = b"\x89PNG\r\n\x1a\n" + header + text + pixels + _chunk(b"IEND", b"")
    status, body = post(client, bomb)
    assert (status, body["error"]["code"]) == (413, "too_many_pixels")


# --- kind 4: complete pixels without a trailer are accepted, cut pixels are not ------


def _jpegs() -> dict[str, bytes]:
    picture = Image.open(CASES / "jpeg_full.jpg").convert("RGB")
    variants = {
        "baseline 4:2:0": {"quality": 80},
        "baseline 4:4:4": {"quality": 90, "subsampling": 0},
        "progressive": {"quality": 90, "progressive": True},
        "restart markers": {"quality": 85, "restart_marker_rows": 1},
    }
    out = {"the shared case": (CASES / "jpeg_full.jpg").read_bytes()}
    for name, options in variants.items():
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", **options)
        out[name] = buffer.getvalue()
    buffer = io.BytesIO()
    picture.convert("L").save(buffer, "JPEG")
    out["greyscale"] = buffer.getvalue()
    return out


def test_the_jpeg_without_its_end_marker_case_answers_like_the_whole_file(
    client: TestClient,
) -> None:
    from service.images import Upload, decode_image

    cut = (CASES / "jpeg_no_eoi.jpg").read_bytes()
    whole = (CASES / "jpeg_full.jpg").read_bytes()
    assert_same_answer(client, cut, whole)
    pixels = decode_image(Upload("cut", cut), 10**6).pixels
    assert np.array_equal(pixels.numpy(), decode_image(Upload("whole", whole), 10**6).pixels)


@pytest.mark.parametrize("name", list(_jpegs()))
def test_a_jpeg_without_its_end_marker_is_accepted_with_exact_pixels(
    client: TestClient, name: str
) -> None:
    whole = _jpegs()[name]
    assert whole.endswith(b"\xff\xd9")
    assert_same_answer(client, whole[:-2], whole)
    assert_same_answer(client, whole[:-1], whole)  # half of the marker written


@pytest.mark.parametrize("name", list(_jpegs()))
def test_a_jpeg_cut_inside_its_pixel_data_stays_422(client: TestClient, name: str) -> None:
    whole = _jpegs()[name]
    first_scan = whole.index(b"\xff\xda")
    scan_bytes = len(whole) - 2 - first_scan
    cuts = {first_scan + scan_bytes * k // 8 for k in range(1, 8)} | {len(whole) - 3}
    for cut in sorted(cuts):
        status, body = post(client, whole[:cut])
        assert (status, body["error"]["code"]) == (422, "corrupt_image"), (cut, body)


def test_a_progressive_jpeg_cut_between_two_scans_stays_422(client: TestClient) -> None:
    whole = _jpegs()["progressive"]
    starts = [i for i in range(len(whole) - 1) if whole[i : i + 2] == b"\xff\xda"]
    assert len(starts) > 3
    for start in starts[1:]:  # every scan present up to here, none after
        status, body = post(client, whole[:start])
        assert (status, body["error"]["code"]) == (422, "corrupt_image"), start


def _png_idats(parts: int) -> tuple[bytes, list[bytes]]:
    """A noise PNG with its compressed data split over `parts` IDAT chunks."""
    rgb = np.random.default_rng(8).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    data = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rgb))
    step = -(-len(data) // parts)
    header = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 8, 2, 0, 0, 0))
    return header, [_chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step)]


def test_png_and_gif_without_their_trailers_are_accepted_and_cut_pngs_are_not(
    client: TestClient,
) -> None:
    header, idats = _png_idats(4)
    whole = header + b"".join(idats) + _chunk(b"IEND", b"")
    assert_same_answer(client, header + b"".join(idats), whole)  # no IEND
    missing_last = header + b"".join(idats[:-1]) + _chunk(b"IEND", b"")
    cut_inside = header + b"".join(idats)[:-40]
    for broken in (missing_last, cut_inside, header + b"".join(idats[:-1])):
        status, body = post(client, broken)
        assert (status, body["error"]["code"]) == (422, "corrupt_image")

    buffer = io.BytesIO()
    Image.open(CASES / "jpeg_full.jpg").convert("P").save(buffer, "GIF")
    gif = buffer.getvalue()
    assert gif.endswith(b";")
    assert_same_answer(client, gif[:-1], gif)
