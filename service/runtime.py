"""The running service: what the routes use, built in the app's lifespan and torn down there.

One request's path, all bounded in memory and time:
  admit (503 while draining, 429 when queue_size images are already in the system)
  -> read the body (413 past max_upload_bytes, while reading)
  -> decode (thumbnails on the event loop, the rest on the decode threads; 4xx for
     anything wrong with the bytes)
  -> queue each image for the batcher -> wait for the answers, the deadline (504) or the
     client leaving (its images are then dropped before they enter a batch).

`/predict` and the Open Inference Protocol routes (service.v2) both walk this path through
the same steps (`admitted`, `admit_more`, `decode`, `preprocess`, `infer`), so they share
one queue limit, one batcher, the deadlines, the drain and the metrics.

The Service owns the engine: it builds it and warms it up on the batcher's inference thread
(`_load`), and hands the batcher a plain batch function (uint8 images -> class
probabilities, through model.inference), so the batcher knows nothing of models.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from starlette.requests import Request

from model.engines.base import Engine
from model.inference import class_probabilities
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
from service.errors import ApiError
from service.images import DecodedImage, Upload, read_uploads
from service.metrics import Metrics
from service.schemas import ImageInfo, Prediction, Timings

logger = logging.getLogger("service")

State = Literal["starting", "ready", "draining", "failed"]
T = TypeVar("T")

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


Probabilities = list[float]  # one image's softmax over the classes, float32 precision


@dataclass
class Ticket:
    """One request's places in the service: images admitted, how many are queued, and its
    deadline (a time.perf_counter() value)."""

    images: int = 1
    queued: int = 0
    deadline: float = 0.0


class Service:
    """Admission, draining, decoding and the batcher, for the routes to use."""

    def __init__(
        self, settings: Settings, engine_factory: Callable[[], Engine], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self.batcher: Batcher[torch.Tensor, Probabilities] = Batcher(
            self._load,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            metrics=metrics,
        )
        # Decoding gets its own small pool (thumbnails excepted): off the event loop, too
        # few threads to starve the inference thread of cores, shared image by image.
        self._decoder = DecodePool(
            settings.decode_threads, settings.max_pixels, settings.inline_decode_max_pixels
        )
        self.state: State = "starting"
        self.model_name = self.model_version = ""
        self.classes: tuple[str, ...] = CIFAR10_CLASSES
        self._pending = 0  # images admitted and not yet answered
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
        engine = self.engine
        self.metrics.engine.info(
            {"engine": engine.name, "device": engine.device, "precision": engine.precision}
        )
        card = engine.card
        self.model_name = card.name
        self.model_version = card.sha256[:12]
        self.classes = card.classes
        if self.state == "starting":  # not if a drain began while loading
            self.state = "ready"

    async def stop(self) -> None:
        await self.batcher.stop()
        self._decoder.shutdown()

    # --- the engine -------------------------------------------------------------------

    def _load(self) -> Callable[[list[torch.Tensor]], list[Probabilities]]:
        """On the inference thread (Batcher.start): build the engine, warm up every batch
        size 1..max_batch_size (all can occur; engines that pad to a few sizes, like
        compiled torch or CUDA graphs, warm only those), and return the batch function."""
        engine = self._engine_factory()
        self._engine = engine  # from here on /health names it, while it warms up
        started = time.perf_counter()
        engine.warm_up(range(1, self.settings.max_batch_size + 1))
        logger.info(
            "warm-up of batch sizes 1..%d took %.1f s",
            self.settings.max_batch_size,
            time.perf_counter() - started,
        )
        mirror_tta = self.settings.mirror_tta

        def classify(images: list[torch.Tensor]) -> list[Probabilities]:
            """uint8 images (3, 32, 32) -> one list of class probabilities each."""
            batch = torch.stack(images)
            return class_probabilities(engine.run, batch, mirror_tta=mirror_tta).tolist()

        return classify

    @property
    def loaded(self) -> bool:
        """Whether the engine has been built (warm-up may still be running)."""
        return self._engine is not None

    @property
    def queue_depth(self) -> int:
        """Images waiting for a forward pass: queued, or in the batch still collecting."""
        return self.batcher.depth

    @property
    def engine(self) -> Engine:
        """The engine, once built (RuntimeError before: check `loaded`)."""
        if self._engine is None:
            raise RuntimeError("the engine has not been built yet")
        return self._engine

    # --- admission and draining -------------------------------------------------------

    @property
    def pending(self) -> int:
        """Images admitted and not yet answered."""
        return self._pending

    def _hold_places(self, ticket: Ticket, images: int) -> None:
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
        self.batcher.expect(images)  # to be read and decoded, then queued
        self._idle.clear()
        self.metrics.pending.set(self._pending)

    def _release(self, ticket: Ticket) -> None:
        self._pending -= ticket.images
        self.batcher.expect(-(ticket.images - ticket.queued))  # never queued, now never will
        self.metrics.pending.set(self._pending)
        if self._pending == 0:
            self._idle.set()

    @asynccontextmanager
    async def _admission(self) -> AsyncIterator[Ticket]:
        """Hold one image's place for the request, more once it is known to carry more;
        checked before the body is read, so an overloaded service reads no uploads."""
        ticket = Ticket(images=0)
        self._hold_places(ticket, 1)
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

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[Ticket]:
        """One request's stay: one image's place (more with `admit_more`), one deadline for
        reading, decoding, queueing and inference (ApiError 504 once it passes), and every
        place released at the end, whatever happened. ApiError 503 while draining, 429 when
        the queue limit is reached."""
        async with self._admission() as ticket:
            ticket.deadline = time.perf_counter() + self.settings.request_timeout_s
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    yield ticket
            except TimeoutError:
                raise ApiError(
                    504,
                    "timeout",
                    f"no answer within the {self.settings.request_timeout_s} s deadline",
                ) from None

    def admit_more(self, ticket: Ticket, images: int) -> None:
        """Hold places for `images` more images of an admitted request (429 past the limit)."""
        if images > 0:
            self._hold_places(ticket, images)

    async def predict(self, request: Request, *, field: str, max_files: int) -> list[Prediction]:
        """Everything between the route and the batcher for /predict and /predict/batch."""
        async with self.admitted() as ticket:
            uploads = await read_uploads(
                request,
                field=field,
                max_files=max_files,
                max_bytes=self.settings.max_upload_bytes,
            )
            self.admit_more(ticket, len(uploads) - 1)
            images = await self.decode(uploads, ticket, name="files")
            results = await self.infer(request, [image.pixels for image in images], ticket)
        return [
            self._prediction(image, result) for image, result in zip(images, results, strict=True)
        ]

    async def preprocess(self, function: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy request work (parsing big JSON bodies) on the decode threads, off
        the event loop, taking its turn with the decoding."""
        return await self._decoder.run(function, *args)

    async def decode(
        self, uploads: list[Upload], ticket: Ticket, *, name: str
    ) -> list[DecodedImage]:
        """Decode image by image (thumbnails on the event loop, the rest on the decode
        threads, taking turns with other requests), stopping at the ticket's deadline
        (service/decoding.py). With several files,
        an error names the culprit as `name[index]: ...`."""
        return await self._decoder.decode(uploads, ticket.deadline, name=name)

    async def infer(
        self, request: Request, pixels: list[torch.Tensor], ticket: Ticket
    ) -> list[Result[Probabilities]]:
        """Queue the images (uint8 (3, 32, 32) each), then wait for their answers or for the
        client to leave. ApiError 429 (queue full), 504 (deadline passed in the queue), 499
        (client gone), 500 (the batch failed), 503 (shutting down)."""
        futures: list[asyncio.Future[Result[Probabilities]]] = []
        try:
            for image in pixels:
                futures.append(self.batcher.submit(image, ticket.deadline))
                ticket.queued += 1
                self.batcher.expect(-1)
            answers = asyncio.gather(*futures)
            watcher = asyncio.ensure_future(_client_gone(request))
            racing: set[asyncio.Future[Any]] = {answers, watcher}
            try:
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
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

    def _prediction(self, image: DecodedImage, result: Result[Probabilities]) -> Prediction:
        probabilities = dict(zip(self.classes, result.output, strict=True))
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
