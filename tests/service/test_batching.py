"""Dynamic batching under concurrency, overload, deadlines, departed clients and failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from starlette.types import Message

from model.engines.base import Engine
from service.app import create_app, load_engine
from tests.support.images import image_bytes, noise_image, png
from tests.support.reference import reference_probabilities
from tests.support.service import gated_factory, metric, running, settings_for


async def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def test_concurrent_requests_share_batches_and_match_the_unbatched_model(
    weights_file: Path,
) -> None:
    images = [noise_image(36, 36, seed=500 + i) for i in range(24)]

    async def scenario() -> tuple[list[httpx.Response], str]:
        settings = settings_for(weights_file, max_batch_size=8, max_wait_ms=100)
        async with running(create_app(settings)) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/predict", files={"file": (f"{i}.png", image_bytes(im, "PNG"))})
                    for i, im in enumerate(images)
                )
            )
            return list(responses), (await client.get("/metrics")).text

    responses, metrics = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses)
    batches = metric(metrics, "inference_batch_size_count")
    assert metric(metrics, "inference_batch_size_sum") == len(images)
    assert batches < len(images)  # requests shared forward passes
    assert max(r.json()["timings"]["batch_size"] for r in responses) > 1
    expected = reference_probabilities(weights_file, images)
    for response, row in zip(responses, expected, strict=True):
        # each answer is its own image's, exactly what the model gives it alone
        np.testing.assert_allclose(
            list(response.json()["probabilities"].values()), row, rtol=1e-4, atol=1e-6
        )


def test_full_queue_answers_429_with_retry_after(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=1, queue_size=2)
    factory, engine = gated_factory(settings)

    async def scenario() -> None:
        app = create_app(settings, factory)
        async with running(app) as client:
            engine().gate.clear()  # inference blocks: admitted images pile up
            held = [
                asyncio.create_task(client.post("/predict", files={"file": ("a", png(i))}))
                for i in range(2)
            ]
            await _wait_until(lambda: app.state.service.pending == 2)
            refused = await client.post("/predict", files={"file": ("a", png(9))})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "overloaded"
            assert refused.headers["retry-after"] == "1"
            batch = await client.post(
                "/predict/batch", files=[("files", ("a", png(1))), ("files", ("b", png(2)))]
            )
            assert batch.status_code == 429
            engine().gate.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            # once the queue has room again, requests are served
            again = await client.post("/predict", files={"file": ("a", png(9))})
            assert again.status_code == 200

    asyncio.run(scenario())


def test_a_batch_of_n_files_holds_n_places_in_the_queue(weights_file: Path) -> None:
    """queue_size counts images, not requests: a batch of 3 files fills a queue of 3, and a
    batch of 4 is refused before any of its images reaches the model."""
    settings = settings_for(weights_file, max_batch_size=1, queue_size=3)
    factory, engine = gated_factory(settings)

    def files(count: int, seed: int) -> list[tuple[str, tuple[str, bytes]]]:
        return [("files", (f"{i}.png", png(seed + i))) for i in range(count)]

    async def scenario() -> str:
        app = create_app(settings, factory)
        async with running(app) as client:
            engine().gate.clear()  # inference blocks: the batch's images stay in hand
            engine().started.clear()
            held = asyncio.create_task(client.post("/predict/batch", files=files(3, 10)))
            await asyncio.to_thread(engine().started.wait, 10)  # image 1 is in run()
            await _wait_until(lambda: app.state.service.queue_depth == 2)  # 2 and 3 queued
            assert app.state.service.pending == 3
            single = await client.post("/predict", files={"file": ("a", png(9))})
            assert single.status_code == 429
            assert single.json()["error"]["code"] == "overloaded"
            assert single.headers["retry-after"] == "1"
            engine().gate.set()
            answered = await held
            assert answered.status_code == 200
            assert len(answered.json()["predictions"]) == 3

            too_many = await client.post("/predict/batch", files=files(4, 20))
            assert too_many.status_code == 429
            assert too_many.json()["error"]["code"] == "overloaded"
            assert too_many.headers["retry-after"] == "1"
            exactly = await client.post("/predict/batch", files=files(3, 30))
            assert exactly.status_code == 200  # the limit itself fits
            return (await client.get("/metrics")).text

    metrics = asyncio.run(scenario())
    # Only the two accepted batches' images were batched; none of the refused ones, not even
    # to be dropped on the way.
    assert metric(metrics, "inference_batch_size_sum") == 3 + 3
    assert metric(metrics, "inference_dropped_images_total", reason="cancelled") == 0


def test_request_past_its_deadline_gets_504_and_never_enters_a_batch(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=1, request_timeout_s=1.0)
    factory, engine = gated_factory(settings)

    async def scenario() -> None:
        app = create_app(settings, factory)
        async with running(app) as client:
            engine().gate.clear()
            engine().started.clear()
            first = asyncio.create_task(client.post("/predict", files={"file": ("a", png(1))}))
            await asyncio.to_thread(engine().started.wait, 10)  # first batch is in run()
            second = await client.post("/predict", files={"file": ("b", png(2))})
            assert second.status_code == 504
            assert second.json()["error"]["code"] == "timeout"
            engine().gate.set()
            # The first request's deadline, set a moment before the second's, passed while
            # its batch was held at the gate: 504 too (the deadline covers inference).
            timed_out = await first
            assert (timed_out.status_code, timed_out.json()["error"]["code"]) == (504, "timeout")
            # FIFO: once a later request is answered, the timed-out one was dealt with
            later = await client.post("/predict", files={"file": ("c", png(3))})
            assert later.status_code == 200
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "inference_dropped_images_total", reason="cancelled") == 1

    asyncio.run(scenario())
    # The first and the later image, each run twice (itself, then its mirror: mirror_tta);
    # never the timed-out one.
    assert engine().batches == [1, 1, 1, 1]


def test_failed_batch_answers_500_and_the_worker_goes_on(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=4)
    factory, engine = gated_factory(settings)

    async def scenario() -> None:
        async with running(create_app(settings, factory)) as client:
            engine().fail = True
            failed = await client.post("/predict", files={"file": ("a", png(1))})
            assert failed.status_code == 500
            assert failed.json()["error"]["code"] == "inference_failed"
            engine().fail = False
            assert (await client.post("/predict", files={"file": ("a", png(1))})).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "inference_batch_failures_total") == 1

    asyncio.run(scenario())


def test_client_that_leaves_is_dropped_before_its_batch(weights_file: Path) -> None:
    """Raw ASGI: the client sends its upload, then disconnects while the worker is busy."""
    settings = settings_for(weights_file, max_batch_size=1)
    factory, engine = gated_factory(settings)
    body = httpx.Request("POST", "http://t/predict", files={"file": ("a", png(3))})
    content = body.read()

    async def scenario() -> list[Message]:
        app = create_app(settings, factory)
        async with running(app) as client:
            engine().gate.clear()
            engine().started.clear()
            busy = asyncio.create_task(client.post("/predict", files={"file": ("a", png(1))}))
            await asyncio.to_thread(engine().started.wait, 10)
            leave = asyncio.Event()
            messages = [{"type": "http.request", "body": content, "more_body": False}]

            async def receive() -> Message:
                if messages:
                    return messages.pop(0)
                await leave.wait()
                return {"type": "http.disconnect"}

            sent: list[Message] = []

            async def send(message: Message) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/predict",
                "raw_path": b"/predict",
                "query_string": b"",
                "root_path": "",
                "headers": [(k.lower().encode(), v.encode()) for k, v in body.headers.items()],
                "client": ("test", 1),
                "server": ("t", 80),
                "state": {},
            }
            call = asyncio.create_task(app(scope, receive, send))
            await _wait_until(lambda: app.state.service.batcher.depth == 1)
            leave.set()
            await asyncio.wait_for(call, 10)
            engine().gate.set()
            assert (await busy).status_code == 200
            # FIFO: once a later request is answered, the departed one was dealt with
            later = await client.post("/predict", files={"file": ("c", png(4))})
            assert later.status_code == 200
            return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 499
    # The busy and the later request, each with its mirror run (mirror_tta); not the departed.
    assert engine().batches == [1, 1, 1, 1]


def test_engine_built_and_run_on_one_inference_thread(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=2)
    threads: list[str] = []

    def factory() -> Engine:
        threads.append(threading.current_thread().name)
        engine = load_engine(settings)
        run = engine.run

        def traced(images: torch.Tensor) -> torch.Tensor:
            threads.append(threading.current_thread().name)
            return run(images)

        engine.run = traced  # type: ignore[method-assign]  # a spy on this one engine's run
        return engine

    async def scenario() -> None:
        async with running(create_app(settings, factory)) as client:
            await asyncio.gather(
                *(client.post("/predict", files={"file": ("a", png(i))}) for i in range(4))
            )

    asyncio.run(scenario())
    assert len(set(threads)) == 1 and threads[0].startswith("inference")


def test_every_batch_size_is_warmed_up_before_ready(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=5)
    factory, engine = gated_factory(settings)

    async def scenario() -> None:
        app = create_app(settings, factory)
        async with running(app) as client:
            assert engine().warmed == [1, 2, 3, 4, 5]
            assert (await client.get("/health")).status_code == 200

    asyncio.run(scenario())


def test_a_lone_request_does_not_wait_for_company(weights_file: Path) -> None:
    """max_wait only applies while more admitted images are on their way."""
    settings = settings_for(weights_file, max_batch_size=8, max_wait_ms=5000)

    async def scenario() -> httpx.Response:
        async with running(create_app(settings)) as client:
            return await client.post("/predict", files={"file": ("a", png(1))})

    response = asyncio.run(scenario())
    assert response.status_code == 200
    assert response.json()["timings"]["queue_ms"] < 1000  # not the 5 s max_wait
