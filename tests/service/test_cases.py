"""The shared cases of issue 14 through the service, and each kind's service-level checks:
transparency (kind 2), metadata (kind 3) and missing trailers (kind 4)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.support import reference_probabilities

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
