"""Dynamic batching: LitServe's loop, on asyncio, with one dedicated inference thread.

    submit(item) -> queue -> collect until max_batch_size, or max_wait after the first item,
                             or sooner when the caller expects no more items (`expect`)
                 -> drop items whose client left or whose deadline passed
                 -> batch function (list of items -> one output per item)
                 -> answer each item's future

The batcher knows nothing of models: it batches whatever items it is given and calls the
batch function it was given (as LitServe's batched loop and BentoML's CorkDispatcher do).
What a forward pass means (engine, test-time augmentation, softmax) is the caller's
business: service.runtime builds the function, with model.inference.

The collecting runs on the event loop; the batch function, and the factory that builds it,
run on ONE long-lived thread. This is for torch and the other engines: each thread that
runs torch gets its own OpenMP thread team, and teams in different threads fight over the
cores, so a forward pass from a fresh thread pool is several times slower on a small CPU
box than one from a single thread that built the engine and does all inference.

While a batch runs, new items pile up in the queue, so under load the next batch fills at
once: batches grow with the load without any tuning. If a batch fails, all of its items
get the error (InferenceError) and the loop goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.metrics import Metrics

logger = logging.getLogger("service")

In = TypeVar("In")
Out = TypeVar("Out")

BatchFunction = Callable[[list[In]], Sequence[Out]]
"""Items in, one output per item, in the same order; called on the inference thread."""


class QueueFullError(Exception):
    """The queue holds queue_size items already."""


class DeadlineExceededError(Exception):
    """The item's deadline passed before it could enter a batch."""


class InferenceError(Exception):
    """The batch function failed for this item's batch."""


class BatcherStoppedError(Exception):
    """The batcher stopped before this item was served."""


@dataclass(frozen=True)
class Result(Generic[Out]):
    """One item's answer from its batch."""

    output: Out  # the batch function's output for this item
    queue_ms: float  # from submit() to the start of its batch
    inference_ms: float  # the batch function's call, for the whole batch
    batch_size: int


@dataclass
class _Item(Generic[In, Out]):
    payload: In
    deadline: float  # time.perf_counter() value
    future: asyncio.Future[Result[Out]]
    enqueued_at: float = field(default_factory=time.perf_counter)


class Batcher(Generic[In, Out]):
    """One worker for one device: a bounded queue, a collecting task, an inference thread.

    `load` builds the batch function; `start` calls it on the inference thread, which then
    makes every call of the function."""

    def __init__(
        self,
        load: Callable[[], BatchFunction[In, Out]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        metrics: Metrics,
    ) -> None:
        self._load = load
        self.max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Item[In, Out]] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._function: BatchFunction[In, Out] | None = None
        self._forming = 0  # items taken off the queue into the batch being collected
        self._expected = 0  # items the caller announced and has not submitted yet
        metrics.track_queue_depth(lambda: self.depth)

    @property
    def depth(self) -> int:
        """Items waiting for the batch function: queued, or in the batch still collecting."""
        return self._queue.qsize() + self._forming

    def expect(self, items: int) -> None:
        """The caller announces `items` more items it is about to submit (being read or
        decoded), or with a negative count, items it has submitted or no longer will.

        While none are announced, a batch stops collecting as soon as the queue is empty: a
        lone request then runs at once instead of idling for max_wait in the hope of
        company."""
        self._expected += items

    async def start(self) -> None:
        """Build the batch function on the inference thread (`load`), then start batching.
        Whatever `load` raises is raised here, and nothing is started."""
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._function = await loop.run_in_executor(self._executor, self._load)
        self._task = asyncio.create_task(self._serve(), name="batcher")

    async def stop(self) -> None:
        """Stop batching; items still queued (none, after a drain) get BatcherStoppedError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(BatcherStoppedError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def submit(self, payload: In, deadline: float) -> asyncio.Future[Result[Out]]:
        """Queue one item (`deadline`: a time.perf_counter() value); its future resolves to a
        Result or raises one of the errors above. Cancelling the future (client gone) drops
        the item before it is batched."""
        if self._task is None or self._task.done():
            raise BatcherStoppedError("the batcher is not running")
        item = _Item[In, Out](payload, deadline, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFullError(f"the queue is full ({self._queue.maxsize} images)") from None
        return item.future

    async def _serve(self) -> None:
        while True:
            try:
                batch = await self._collect()
            finally:
                self._forming = 0
            if batch:
                await self._run_batch(batch)

    def _still_wanted(self, item: _Item[In, Out], now: float) -> bool:
        """Whether a queued item still deserves a place in a batch."""
        if item.future.done():  # cancelled: the client left or its request timed out
            self._metrics.dropped.labels("cancelled").inc()
            return False
        if now > item.deadline:
            self._metrics.dropped.labels("expired").inc()
            item.future.set_exception(DeadlineExceededError("the deadline passed in the queue"))
            return False
        return True

    async def _collect(self) -> list[_Item[In, Out]]:
        """Up to max_batch_size live items, waiting at most max_wait after the first.

        Unlike a plain deadline, the wait also ends as soon as the queue is empty and the
        caller expects no more items (`expect`)."""
        batch: list[_Item[In, Out]] = []
        first = await self._queue.get()
        if not self._still_wanted(first, time.perf_counter()):
            return batch
        batch.append(first)
        self._forming = 1
        wait_until = time.perf_counter() + self._max_wait_s
        try:
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = wait_until - time.perf_counter()
                    if remaining <= 0 or self._expected <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            item = await self._queue.get()
                    except TimeoutError:
                        break
                if self._still_wanted(item, time.perf_counter()):
                    batch.append(item)
                    self._forming = len(batch)
        except asyncio.CancelledError:  # stop() while collecting: nobody may wait forever
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherStoppedError("the service stopped"))
            raise
        return batch

    def _call(self, payloads: list[In]) -> tuple[Sequence[Out], float]:
        """On the inference thread: the batch function, timed and checked."""
        assert self._function is not None  # start() built it before any batch
        started = time.perf_counter()
        outputs = self._function(payloads)
        if len(outputs) != len(payloads):
            raise RuntimeError(f"{len(outputs)} outputs for a batch of {len(payloads)} items")
        return outputs, time.perf_counter() - started

    async def _run_batch(self, batch: list[_Item[In, Out]]) -> None:
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_wait.observe(started - item.enqueued_at)
        self._metrics.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        try:
            outputs, seconds = await loop.run_in_executor(
                self._executor, self._call, [item.payload for item in batch]
            )
        except asyncio.CancelledError:  # stop() during a batch: answer, then stop
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherStoppedError("the service stopped"))
            raise
        except Exception as error:  # one failure answers the whole batch, then we go on
            logger.exception("inference failed for a batch of %d items", len(batch))
            self._metrics.batch_failures.inc()
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(InferenceError(f"inference failed: {error}"))
            return
        self._metrics.inference_time.observe(seconds)
        for item, output in zip(batch, outputs, strict=True):
            if not item.future.done():  # its request may have timed out meanwhile
                item.future.set_result(
                    Result(
                        output=output,
                        queue_ms=(started - item.enqueued_at) * 1000,
                        inference_ms=seconds * 1000,
                        batch_size=len(batch),
                    )
                )
