"""The running service: what the routes use, built in the app's lifespan and torn down there.

One request's path, all bounded in memory and time:
  admit (503 while draining, 429 when queue_size images are already in the system)
  -> read the multipart body (413 past max_upload_bytes, while reading)
  -> decode on the decode threads (4xx for anything wrong with the bytes)
  -> queue each image for the batcher -> wait for the answers, the deadline (504) or the
     client leaving (its images are then dropped before they enter a batch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from model.preprocessing import CIFAR10_CLASSES
from service.batcher import (
    Batcher,
    BatcherStoppedError,
    DeadlineExceededError,
    InferenceError,
    QueueFullError,
    Result,
)
from service.config import Settings
from service.decoding import DecodePool
from service.engines.base import Engine
from service.errors import ApiError
from service.images import DecodedImage, read_uploads
from service.metrics import Metrics
from service.schemas import ImageInfo, Prediction, Timings

State = Literal["starting", "ready", "draining", "failed"]

# Seconds a client is told to wait after a 429/503; a batch takes milliseconds, so a
# second is enough for the queue to have moved on.
RETRY_AFTER_S = 1


def _shutting_down() -> ApiError:
    return ApiError(
        503,
        "shutting_down",
        "the service is shutting down; retry on another instance",
        {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"},
    )


def _not_ready(state: State) -> ApiError:
    if state == "failed":
        return ApiError(503, "not_ready", "the model failed to load; the service log says why")
    return ApiError(
        503,
        "not_ready",
        f"the model is still loading; retry after {RETRY_AFTER_S} s",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects. The body is read by now, so the next ASGI
    message can only be http.disconnect (sent on disconnect, or once the response is out)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Ticket:
    """One request's places in the service: images admitted, and how many are queued."""

    images: int = 1
    queued: int = 0


class Service:
    """Admission, draining, decoding and the batcher, for the routes to use."""

    def __init__(
        self, settings: Settings, engine_factory: Callable[[], Engine], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.batcher = Batcher(
            engine_factory,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            metrics=metrics,
            more_coming=lambda: self._incoming > 0,
            mirror_tta=settings.mirror_tta,
        )
        # Decoding gets its own small pool: off the event loop, too few threads to starve
        # the inference thread of cores, and shared image by image between requests.
        self._decoder = DecodePool(settings.decode_threads, settings.max_pixels)
        self.state: State = "starting"
        self.model_name = self.model_version = ""
        self.classes: tuple[str, ...] = CIFAR10_CLASSES
        self._pending = 0  # images admitted and not yet answered
        self._incoming = 0  # of those, images not yet queued (being read or decoded)
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Load and warm up the engine (on the inference thread), then accept requests.

        The app runs this in the background while the port is already open, so that the
        health endpoints answer throughout: state "starting" until here, then "ready", or
        "failed" if loading raised (the error is re-raised for the caller to log)."""
        try:
            await self.batcher.start()
        except Exception:
            self.state = "failed"
            raise
        card = self.batcher.engine.card
        self.model_name = str(card.get("name", "model"))
        self.model_version = str(card.get("sha256", ""))[:12]
        self.classes = tuple(card.get("classes") or CIFAR10_CLASSES)
        if self.state == "starting":  # not if a drain began while loading
            self.state = "ready"

    async def stop(self) -> None:
        await self.batcher.stop()
        self._decoder.shutdown()

    # --- admission and draining -------------------------------------------------------

    @property
    def pending(self) -> int:
        """Images admitted and not yet answered."""
        return self._pending

    def _admit(self, ticket: _Ticket, images: int) -> None:
        if self.state in ("starting", "failed"):
            raise _not_ready(self.state)
        if self.state != "ready":
            raise _shutting_down()
        if self._pending + images > self.settings.queue_size:
            raise ApiError(
                429,
                "overloaded",
                f"the service has {self._pending} images in hand (limit "
                f"{self.settings.queue_size}); retry after {RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        ticket.images += images
        self._pending += images
        self._incoming += images
        self._idle.clear()
        self.metrics.pending.set(self._pending)

    def _release(self, ticket: _Ticket) -> None:
        self._pending -= ticket.images
        self._incoming -= ticket.images - ticket.queued
        self.metrics.pending.set(self._pending)
        if self._pending == 0:
            self._idle.set()

    @asynccontextmanager
    async def _admission(self) -> AsyncIterator[_Ticket]:
        """Hold one image's place for the request, more once it is known to carry more;
        checked before the body is read, so an overloaded service reads no uploads."""
        ticket = _Ticket(images=0)
        self._admit(ticket, 1)
        try:
            yield ticket
        finally:
            self._release(ticket)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait until every admitted image is answered."""
        self.state = "draining"
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # --- one request --------------------------------------------------------------------

    async def predict(self, request: Request, *, field: str, max_files: int) -> list[Prediction]:
        """Everything between the route and the batcher for /predict and /predict/batch."""
        async with self._admission() as ticket:
            # One deadline for the whole request: reading, decoding, queueing, inference.
            deadline = time.perf_counter() + self.settings.request_timeout_s
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    uploads = await read_uploads(
                        request,
                        field=field,
                        max_files=max_files,
                        max_bytes=self.settings.max_upload_bytes,
                    )
                    if len(uploads) > 1:
                        self._admit(ticket, len(uploads) - 1)
                    images = await self._decoder.decode(uploads, deadline)
                    results = await self._infer(request, images, ticket, deadline)
            except TimeoutError:
                raise ApiError(
                    504,
                    "timeout",
                    f"no answer within the {self.settings.request_timeout_s} s deadline",
                ) from None
        return [
            self._prediction(image, result) for image, result in zip(images, results, strict=True)
        ]

    async def _infer(
        self, request: Request, images: list[DecodedImage], ticket: _Ticket, deadline: float
    ) -> list[Result]:
        """Queue the images, then wait for their answers or for the client to leave."""
        futures: list[asyncio.Future[Result]] = []
        try:
            for image in images:
                futures.append(self.batcher.submit(image.pixels, deadline))
                ticket.queued += 1
                self._incoming -= 1
            answers = asyncio.gather(*futures)
            watcher = asyncio.ensure_future(_client_gone(request))
            try:
                await asyncio.wait({answers, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            if not answers.done():
                raise ApiError(499, "client_closed_request", "the client closed the connection")
            return answers.result()
        except QueueFullError as error:
            raise ApiError(
                429, "overloaded", str(error), {"Retry-After": str(RETRY_AFTER_S)}
            ) from None
        except DeadlineExceededError:
            raise ApiError(
                504, "timeout", "the deadline passed while the image was queued"
            ) from None
        except InferenceError as error:
            raise ApiError(500, "inference_failed", str(error)) from None
        except BatcherStoppedError:
            raise _shutting_down() from None
        finally:
            # Whatever happened (timeout, client gone, an error for a sibling image), images
            # not yet served are dropped before they enter a batch.
            for future in futures:
                future.cancel()

    def _prediction(self, image: DecodedImage, result: Result) -> Prediction:
        probabilities = dict(zip(self.classes, result.probabilities, strict=True))
        label = max(probabilities, key=probabilities.__getitem__)
        return Prediction(
            label=label,
            probability=probabilities[label],
            probabilities=probabilities,
            model_version=self.model_version,
            image=ImageInfo(
                filename=image.filename,
                format=image.format,
                mode=image.mode,
                width=image.width,
                height=image.height,
            ),
            timings=Timings(
                decode_ms=round(image.decode_ms, 3),
                queue_ms=round(result.queue_ms, 3),
                inference_ms=round(result.inference_ms, 3),
                batch_size=result.batch_size,
            ),
        )
