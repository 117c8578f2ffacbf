"""Dynamic batching: LitServe's loop, on asyncio, with long-lived inference threads.

    submit(item) -> queue -> wait for a free model instance
                 -> collect until max_batch_size, or max_wait after the first item,
                    or sooner when the caller expects no more items (`expect`)
                 -> drop items whose client left or whose deadline passed
                 -> that instance's batch function (list of items -> one output per item)
                 -> answer each item's future

The batcher knows nothing of models: it batches whatever items it is given and calls the
batch function it was given (as LitServe's batched loop and BentoML's CorkDispatcher do).
What a forward pass means (engine, test-time augmentation, softmax) is the caller's
business: service.runtime builds the function, with model.inference.

The collecting runs on the event loop; each model instance (Triton's term: a copy of the
model with its own execution thread) is one batch function built by `load` on ONE
long-lived thread, which then makes every call of it. One thread per instance is for torch
and the other engines: each thread that runs torch gets its own OpenMP thread team, and
teams in different threads fight over the cores, so a forward pass from a fresh thread pool
is several times slower on a small CPU box than one from a single thread that built the
engine and does all its inference.

With one instance (the default) a batch is collected only once the previous one has
finished; with several, up to that many batches are in flight, each on a free instance, so
a CPU's cores can be split between instances that never wait for one another.

While every instance is busy, new items pile up in the queue, so under load the next batch
fills at once: batches grow with the load without any tuning. If a batch fails, all of its
items get the error (InferenceError) and the loop goes on with the next batch.
"""

from __future__ import annotations

import asyncio
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


@dataclass(frozen=True)
class _Instance(Generic[In, Out]):
    """One model instance: its inference thread and the batch function built there."""

    thread: ThreadPoolExecutor
    function: BatchFunction[In, Out]


class Batcher(Generic[In, Out]):
    """One worker for one device: a bounded queue, a collecting task, and `instances` model
    instances, each a batch function on its own inference thread.

    `load` builds one instance's batch function; `start` calls it once on each inference
    thread, which then makes every call of that function."""

    def __init__(
        self,
        load: Callable[[], BatchFunction[In, Out]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        metrics: Metrics,
        instances: int = 1,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be at least 1, not {instances}")
        self._load = load
        self.instances = instances
        self.max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Item[In, Out]] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._threads: list[ThreadPoolExecutor] = []  # one per instance, once started
        self._idle: asyncio.Queue[_Instance[In, Out]] = asyncio.Queue()
        self._running: set[asyncio.Task[None]] = set()  # batches in flight
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
        """Build each instance's batch function on its inference thread (`load`, one
        instance after the other), then start batching. Whatever `load` raises is raised
        here and no batch is ever run; `stop` still joins the threads already started."""
        loop = asyncio.get_running_loop()
        for index in range(self.instances):
            thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inference-{index}")
            self._threads.append(thread)  # for stop() to join, even while it loads
            function = await loop.run_in_executor(thread, self._load)
            self._idle.put_nowait(_Instance(thread, function))
        self._task = asyncio.create_task(self._serve(), name="batcher")

    async def stop(self) -> None:
        """Stop batching: batches in flight and items still queued (none, after a drain)
        get BatcherStoppedError; then wait for the inference threads to finish what they
        are running (off the event loop)."""
        tasks = [task for task in (self._task, *self._running) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(BatcherStoppedError("the service is shutting down"))
        await asyncio.gather(*(asyncio.to_thread(thread.shutdown) for thread in self._threads))

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
            instance = await self._idle.get()
            try:
                batch = await self._collect()
            except BaseException:
                self._idle.put_nowait(instance)
                raise
            finally:
                self._forming = 0
            if not batch:
                self._idle.put_nowait(instance)
                continue
            task = asyncio.create_task(self._run_batch(instance, batch), name="batch")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

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

    @staticmethod
    def _call(function: BatchFunction[In, Out], payloads: list[In]) -> tuple[Sequence[Out], float]:
        """On an inference thread: its batch function, timed and checked."""
        started = time.perf_counter()
        outputs = function(payloads)
        if len(outputs) != len(payloads):
            raise RuntimeError(f"{len(outputs)} outputs for a batch of {len(payloads)} items")
        return outputs, time.perf_counter() - started

    async def _run_batch(self, instance: _Instance[In, Out], batch: list[_Item[In, Out]]) -> None:
        """Run one batch on `instance` and answer its items; the instance is free again after.
        Whatever happens, no item of the batch is left without an answer."""
        try:
            await self._answer(instance, batch)
        finally:
            for item in batch:  # only if _answer itself broke (it answers every error)
                if not item.future.done():
                    item.future.set_exception(InferenceError("the batch was abandoned"))
            self._idle.put_nowait(instance)

    async def _answer(self, instance: _Instance[In, Out], batch: list[_Item[In, Out]]) -> None:
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_wait.observe(started - item.enqueued_at)
        self._metrics.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        try:
            outputs, seconds = await loop.run_in_executor(
                instance.thread, self._call, instance.function, [item.payload for item in batch]
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
