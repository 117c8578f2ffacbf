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
from PIL.PngImagePlugin import PngInfo

import service.decoding
from service.app import create_app
from service.config import Settings
from service.images import DecodedImage, Upload, decode_image
from tests.support.images import image_bytes, noise_image, png
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
    """Wraps service.decoding's decode_image: records when each file's decode (or inline
    attempt) starts and ends, and on which thread it last ran."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []  # (start|end, filename, time)
        self.threads: dict[str, str] = {}  # filename -> the thread that last decoded it
        self._lock = threading.Lock()

    def __call__(self, upload: Upload, max_pixels: int, *, retry: bool = True) -> DecodedImage:
        with self._lock:
            self.events.append(("start", upload.filename or "", time.perf_counter()))
            self.threads[upload.filename or ""] = threading.current_thread().name
        try:
            return decode_image(upload, max_pixels, retry=retry)
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


def _thumbnail_with_text(characters: int) -> bytes:
    """A 32x32 PNG carrying a text chunk of `characters` bytes."""
    info = PngInfo()
    info.add_text("comment", "x" * characters)
    return image_bytes(noise_image(32, 32, seed=3), "PNG", pnginfo=info)


def _posted_one_by_one(settings: Settings, files: dict[str, bytes]) -> list[httpx.Response]:
    async def scenario() -> list[httpx.Response]:
        async with running(create_app(settings)) as client:
            return [
                await client.post("/predict", files={"file": (name, data)})
                for name, data in files.items()
            ]

    return asyncio.run(scenario())


def test_thumbnails_decode_on_the_event_loop_and_everything_else_on_the_threads(
    weights_file: Path, decode_log: DecodeLog
) -> None:
    """Inline: a PNG and a JPEG of at most inline_decode_max_pixels pixels. Threads: more
    pixels, more bytes than 4 a pixel plus 4 KiB (metadata to parse), another format, or
    a first attempt that fails (here a JPEG cut before its end marker, which the threads
    complete: the retries' cost is not bounded by the pixel count)."""
    settings = settings_for(weights_file, inline_decode_max_pixels=4096)
    thumbnail = noise_image(32, 32, seed=1)
    files = {
        "png": png(1, 32, 32),
        "jpeg": image_bytes(thumbnail, "JPEG"),
        "more pixels": png(2, 100, 100),  # 10,000 pixels
        "more bytes": _thumbnail_with_text(30_000),  # over 4 x 4096 + 4096 bytes
        "bmp": image_bytes(thumbnail, "BMP"),
        "jpeg without end marker": image_bytes(thumbnail, "JPEG")[:-2],
    }
    responses = _posted_one_by_one(settings, files)
    assert [response.status_code for response in responses] == [200] * len(files)
    loop_thread = threading.main_thread().name  # running() serves the app on it
    where = {name: decode_log.threads[name] for name in files}
    assert where["png"] == where["jpeg"] == loop_thread, where
    others = [where[name] for name in files if name not in ("png", "jpeg")]
    assert all(thread.startswith("decode") for thread in others), where


def test_a_bad_thumbnail_gets_the_same_answer_with_inline_decoding_on_or_off(
    weights_file: Path,
) -> None:
    truncated = png(4, 32, 32)[:1500]
    answers = []
    for inline in (0, 4096):
        settings = settings_for(weights_file, inline_decode_max_pixels=inline)
        [response] = _posted_one_by_one(settings, {"cut.png": truncated})
        answers.append((response.status_code, response.json()["error"]["code"]))
    assert answers == [(422, "corrupt_image")] * 2


def test_inline_decoding_never_lets_an_image_past_max_pixels(weights_file: Path) -> None:
    """The inline limit is capped at max_pixels: a 1,440-pixel image is refused under a
    max_pixels of 1,000, whatever the inline limit says."""
    settings = settings_for(weights_file, max_pixels=1000, inline_decode_max_pixels=4096)
    [response] = _posted_one_by_one(settings, {"x.png": png(1, 40, 36)})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "too_many_pixels"
