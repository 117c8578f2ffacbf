"""Work in proportion to the input (issue 14, kind 1): extreme aspect ratios are answered
cheaply and correctly, requests take turns on the decode thread image by image, and a
batch stops decoding when its deadline passes."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import service.decoding
from service.app import create_app
from service.images import DecodedImage, Upload, decode_image
from tests.support.images import image_bytes, png
from tests.support.reference import reference_probabilities
from tests.support.service import running, settings_for

CASES = Path(__file__).parent / "cases"


def test_the_1x100000_case_is_answered_by_the_rule(client: TestClient, weights_file: Path) -> None:
    data = (CASES / "tall_1x100000.png").read_bytes()
    response = client.post("/predict", files={"file": ("tall.png", data)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["image"]["width"], body["image"]["height"]) == (1, 100_000)
    [expected] = reference_probabilities(weights_file, [Image.open(io.BytesIO(data))])
    np.testing.assert_allclose(list(body["probabilities"].values()), expected, rtol=1e-4)


@pytest.mark.parametrize("size", [(1, 1_000_000), (1_000_000, 1), (3, 300_000)], ids=str)
def test_extreme_aspect_ratios_up_to_max_pixels_are_answered(
    client: TestClient, size: tuple[int, int]
) -> None:
    image = Image.new("RGB", size, (200, 30, 30))
    response = client.post("/predict", files={"file": ("x.png", image_bytes(image, "PNG"))})
    assert response.status_code == 200, response.text


class DecodeLog:
    """Wraps service.decoding's decode_image: records when each file's decode starts/ends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []  # (start|end, filename, time)
        self.threads: dict[str, str] = {}  # filename -> the thread that last decoded it
        self._lock = threading.Lock()

    def __call__(self, upload: Upload, max_pixels: int) -> DecodedImage:
        with self._lock:
            self.events.append(("start", upload.filename or "", time.perf_counter()))
            self.threads[upload.filename or ""] = threading.current_thread().name
        try:
            return decode_image(upload, max_pixels)
        finally:
            with self._lock:
                self.events.append(("end", upload.filename or "", time.perf_counter()))

    def started(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [name for kind, name, _ in self.events if kind == "start" and prefix in name]


@pytest.fixture
def decode_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[DecodeLog]:
    log = DecodeLog()
    monkeypatch.setattr(service.decoding, "decode_image", log)
    yield log


def _heavy_png() -> bytes:
    """16 kB that decode to 4 million pixels: about 0.1 s of one core each here."""
    return image_bytes(Image.new("RGB", (2000, 2000), (10, 200, 30)), "PNG")


def test_a_small_request_waits_for_at_most_one_image_of_a_heavy_batch(
    weights_file: Path, decode_log: DecodeLog
) -> None:
    """The bound (docs/api.md, Limits): a request waits on the decode threads for at most one
    image of each request ahead of it. Here one decode thread, a batch of 6 heavy images
    sent first, and a small image sent once the batch has started decoding (with inline
    decoding off, so that the small image too takes its turn on the thread)."""
    heavy = _heavy_png()
    settings = settings_for(
        weights_file,
        decode_threads=1,
        max_files=6,
        max_pixels=5_000_000,
        max_batch_size=8,
        inline_decode_max_pixels=0,
    )

    async def scenario() -> tuple[httpx.Response, httpx.Response, float, float]:
        async with running(create_app(settings)) as client:
            files = [("files", (f"heavy{i}", heavy)) for i in range(6)]
            batch = asyncio.create_task(client.post("/predict/batch", files=files, timeout=60))
            while not decode_log.started("heavy"):
                await asyncio.sleep(0.001)
            sent = time.perf_counter()
            small = await client.post("/predict", files={"file": ("small", png(1))}, timeout=60)
            small_done = time.perf_counter()
            batch_response = await batch
            return small, batch_response, small_done - sent, time.perf_counter() - sent

    small, batch, small_latency, batch_latency = asyncio.run(scenario())
    assert small.status_code == 200 and batch.status_code == 200, (small.text, batch.text)
    order = decode_log.started()
    # Turns: the heavy image in hand when the small one arrived, then the small one.
    assert order.index("small") <= 2, order
    assert order.count("heavy0") == 1 and len(order) == 7, order
    # In time: the small answer came while the batch still had most of its work to do.
    assert small_latency < batch_latency / 2, (small_latency, batch_latency)


def test_a_batch_stops_decoding_when_its_deadline_passes(
    weights_file: Path, decode_log: DecodeLog
) -> None:
    heavy = _heavy_png()
    settings = settings_for(
        weights_file,
        decode_threads=1,
        max_files=16,
        max_pixels=5_000_000,
        max_upload_bytes=2_000_000,
        request_timeout_s=0.3,
        inline_decode_max_pixels=0,
    )

    async def scenario() -> tuple[httpx.Response, int]:
        async with running(create_app(settings)) as client:
            files = [("files", (f"heavy{i}", heavy)) for i in range(16)]
            response = await client.post("/predict/batch", files=files, timeout=60)
            started_by_answer = len(decode_log.started())
            await asyncio.sleep(0.5)  # the image in hand finishes; nothing new may start
            assert len(decode_log.started()) == started_by_answer
            return response, started_by_answer

    response, started = asyncio.run(scenario())
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert started < 16  # 16 images take about 1.6 s here; the deadline was 0.3 s


def test_small_images_decode_on_the_event_loop_and_larger_ones_on_the_threads(
    weights_file: Path, decode_log: DecodeLog
) -> None:
    settings = settings_for(weights_file, inline_decode_max_pixels=4096)
    small, large = png(1, 32, 32), png(2, 100, 100)  # 1,024 and 10,000 pixels

    async def scenario() -> list[httpx.Response]:
        async with running(create_app(settings)) as client:
            return [
                await client.post("/predict", files={"file": (name, data)})
                for name, data in (("small", small), ("large", large))
            ]

    responses = asyncio.run(scenario())
    assert [response.status_code for response in responses] == [200, 200]
    assert decode_log.threads["small"] == threading.main_thread().name  # the event loop's
    assert decode_log.threads["large"].startswith("decode")


def test_inline_decoding_never_lets_an_image_past_max_pixels(weights_file: Path) -> None:
    """The inline limit is capped at max_pixels: a 1,440-pixel image is refused under a
    max_pixels of 1,000, whatever the inline limit says."""
    settings = settings_for(weights_file, max_pixels=1000, inline_decode_max_pixels=4096)

    async def scenario() -> httpx.Response:
        async with running(create_app(settings)) as client:
            return await client.post("/predict", files={"file": ("x.png", png(1, 40, 36))})

    response = asyncio.run(scenario())
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_many_pixels"
