"""POST /predict with every accepted format, mode and odd size, and every kind of bad input."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.support.images import image_bytes, noise_image, png
from tests.support.reference import reference_probabilities
from tests.support.service import running, settings_for


def post(client: TestClient, data: bytes, name: str = "upload") -> tuple[int, dict]:
    response = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
    return response.status_code, response.json()


def assert_matches_reference(body: dict, weights: Path, image: Image.Image) -> None:
    [expected] = reference_probabilities(weights, [image])
    got = list(body["probabilities"].values())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


# --- formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "reported", "save"),
    [
        ("PNG", "PNG", {}),
        ("JPEG", "JPEG", {"quality": 90}),
        ("BMP", "BMP", {}),
        ("WEBP", "WEBP", {"lossless": True}),
        ("GIF", "GIF", {}),
        ("TIFF", "TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_each_format_is_accepted_and_preprocessed_like_training(
    client: TestClient, weights_file: Path, fmt: str, reported: str, save: dict
) -> None:
    data = image_bytes(noise_image(45, 37, seed=3), fmt, **save)
    status, body = post(client, data, f"x.{fmt.lower()}")
    assert status == 200, body
    assert body["image"] == {
        "filename": f"x.{fmt.lower()}",
        "format": reported,
        "mode": Image.open(io.BytesIO(data)).mode,
        "width": 45,
        "height": 37,
    }
    # The service's answer is the model's answer for the decoded file, preprocessed by
    # model.preprocessing exactly as training does.
    assert_matches_reference(body, weights_file, Image.open(io.BytesIO(data)))


def test_animated_gif_uses_the_first_frame(client: TestClient, weights_file: Path) -> None:
    first, second = noise_image(32, 32, seed=1), noise_image(32, 32, seed=2)
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    status, body = post(client, buffer.getvalue())
    assert status == 200, body
    frame0 = Image.open(io.BytesIO(buffer.getvalue()))  # Pillow opens on frame 0
    assert_matches_reference(body, weights_file, frame0.convert("RGB"))
    frame0.seek(1)
    [other] = reference_probabilities(weights_file, [frame0.convert("RGB")])
    assert not np.allclose(list(body["probabilities"].values()), other, atol=1e-6)


def test_multi_page_tiff_uses_the_first_page(client: TestClient, weights_file: Path) -> None:
    pages = [noise_image(33, 31, seed=4), noise_image(33, 31, seed=5)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    status, body = post(client, buffer.getvalue())
    assert status == 200, body
    assert_matches_reference(body, weights_file, pages[0])


# --- modes ----------------------------------------------------------------------------


def _modes() -> Iterator[tuple[str, str, Image.Image]]:
    base = noise_image(40, 30, seed=7)
    yield "L", "PNG", base.convert("L")
    yield "1", "PNG", base.convert("1")
    yield "P", "PNG", base.convert("P")
    yield "RGBA", "PNG", base.convert("RGBA")
    yield "LA", "PNG", base.convert("LA")
    yield "CMYK-jpeg", "JPEG", base.convert("CMYK")
    yield "CMYK-tiff", "TIFF", base.convert("CMYK")
    gradient = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    yield "I;16", "PNG", Image.fromarray(gradient)
    yield "I;16-tiff", "TIFF", Image.fromarray(gradient)
    transparent = base.convert("P")
    transparent.info["transparency"] = 0
    yield "P+transparency", "PNG", transparent


@pytest.mark.parametrize(("label", "fmt", "image"), list(_modes()), ids=lambda v: str(v)[:14])
def test_every_mode_becomes_rgb(
    client: TestClient, weights_file: Path, label: str, fmt: str, image: Image.Image
) -> None:
    data = image_bytes(image, fmt, **({"transparency": 0} if label == "P+transparency" else {}))
    status, body = post(client, data)
    assert status == 200, body
    decoded = Image.open(io.BytesIO(data))
    assert body["image"]["mode"] == decoded.mode
    assert_matches_reference(body, weights_file, decoded)
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4


# --- sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(1, 1), (1, 300), (300, 1), (31, 33), (32, 32), (33, 31), (400, 300), (7, 1000)]
)
def test_any_size_becomes_32x32(
    client: TestClient, weights_file: Path, size: tuple[int, int]
) -> None:
    image = noise_image(*size, seed=sum(size))
    status, body = post(client, image_bytes(image, "PNG"))
    assert status == 200, body
    assert (body["image"]["width"], body["image"]["height"]) == size
    assert_matches_reference(body, weights_file, image)


def test_exif_orientation_is_applied(client: TestClient, weights_file: Path) -> None:
    image = noise_image(48, 32, seed=11)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn
    status, body = post(client, image_bytes(image, "JPEG", quality=95, exif=exif))
    assert status == 200, body
    upright = Image.open(io.BytesIO(image_bytes(image, "JPEG", quality=95))).transpose(
        Image.Transpose.ROTATE_270
    )
    assert_matches_reference(body, weights_file, upright)


# --- bad input ------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but carries almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _bad_inputs() -> Iterator[tuple[str, bytes, int, str]]:
    good = png(seed=1)
    jpeg = image_bytes(noise_image(64, 64, seed=1), "JPEG")
    yield "empty", b"", 400, "empty_file"
    yield "text", b"hello, this is not an image\n" * 10, 415, "not_an_image"
    yield "random-bytes", np.random.default_rng(0).bytes(5000), 415, "not_an_image"
    yield "truncated-png", good[: len(good) // 2], 422, "corrupt_image"
    yield "truncated-jpeg", jpeg[: len(jpeg) // 2], 422, "corrupt_image"
    yield "png-signature-only", good[:8], 415, "not_an_image"
    yield "ppm", image_bytes(noise_image(8, 8, seed=1), "PPM"), 415, "unsupported_format"
    yield "ico", image_bytes(noise_image(16, 16, seed=1), "ICO"), 415, "unsupported_format"
    # Over the test app's max_pixels (1e6), from the header alone: 2000 x 2000 and a
    # decompression bomb that Pillow itself would refuse to open (1e10 pixels).
    yield "too-many-pixels", _png_header_only(2000, 2000), 413, "too_many_pixels"
    yield "bomb", _png_header_only(100_000, 100_000), 413, "too_many_pixels"


@pytest.mark.parametrize(("label", "data", "status", "code"), list(_bad_inputs()), ids=str)
def test_bad_files_get_a_4xx_with_a_code(
    client: TestClient, label: str, data: bytes, status: int, code: str
) -> None:
    got_status, body = post(client, data)
    assert (got_status, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"]


def test_no_file_field(client: TestClient) -> None:
    response = client.post("/predict", data={"other": "value"}, files={"image": ("a", png())})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_file"


def test_not_multipart(client: TestClient) -> None:
    response = client.post("/predict", content=png(), headers={"content-type": "image/png"})
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "not_multipart"
    assert client.post("/predict").json()["error"]["code"] == "not_multipart"


def test_malformed_multipart(client: TestClient) -> None:
    response = client.post(
        "/predict",
        content=b"--b\r\nno headers end here",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_multipart"
    response = client.post(
        "/predict", content=b"x", headers={"content-type": "multipart/form-data"}
    )
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_multipart")


def test_two_files_on_predict(client: TestClient) -> None:
    response = client.post("/predict", files=[("file", ("a", png(1))), ("file", ("b", png(2)))])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_files"


def test_too_many_files_on_batch(client: TestClient) -> None:
    files = [("files", (f"{i}.png", png(i))) for i in range(5)]  # the test app allows 4
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_many_files"


def test_one_bad_file_refuses_the_batch_and_names_it(client: TestClient) -> None:
    files = [("files", ("a.png", png(1))), ("files", ("b.png", b"")), ("files", ("c", png(3)))]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "empty_file",
        "message": "files[1]: the file is empty",
    }


def test_upload_too_large_by_content_length(client: TestClient) -> None:
    big = np.random.default_rng(1).bytes(600_000)  # the test app allows 500 kB
    status, body = post(client, big)
    assert (status, body["error"]["code"]) == (413, "upload_too_large")


def test_upload_too_large_is_refused_while_reading(weights_file: Path) -> None:
    """No Content-Length (chunked): the service stops reading at the limit rather than
    buffering the whole body first. (httpx's ASGI transport pulls the body lazily, as a
    socket would; the sync TestClient would buffer it all before the app saw a byte.)"""
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\n"
        for _ in range(1000):  # 64 MB if it were all read
            sent.append(1)
            yield b"\0" * 65536

    async def scenario() -> httpx.Response:
        app = create_app(settings_for(weights_file, max_batch_size=1, max_upload_bytes=500_000))
        async with running(app) as client:
            return await client.post(
                "/predict",
                content=body(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )

    response = asyncio.run(scenario())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"
    assert len(sent) <= 9  # 500 kB is eight 64 kB chunks
