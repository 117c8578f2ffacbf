"""The decode threads, shared fairly between requests.

Decoding is the one step whose cost depends on what a client sends (up to `max_pixels`
per image, `max_files` images per request), so it is where one request could hold up all
the others. Three rules keep that bounded:

- Each request decodes one image at a time, and queues again for the next one. The
  queue is first come, first served (asyncio.Semaphore wakes its waiters in order), so
  requests take turns image by image: a request waits for at most one image of each
  request ahead of it, never for a whole batch of someone else's uploads.
- At most `threads` images are decoded at once, whoever sent them: memory for decoded
  pixels stays at `threads` images of at most `max_pixels` each.
- No image starts decoding after its request's deadline has passed: a `/predict/batch`
  that ran out of time stops at the image in hand instead of decoding the rest for
  nobody.

Each hand-over to a thread costs a round trip of the GIL; one per image (rather than one
per request, as before) is the price of taking turns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.errors import ApiError
from service.images import DecodedImage, Upload, decode_image

T = TypeVar("T")


def deadline_passed() -> ApiError:
    return ApiError(504, "timeout", "the deadline passed before every image was decoded")


class DecodePool:
    """`threads` decoding threads that requests share image by image, in arrival order."""

    def __init__(self, threads: int, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self._turns = asyncio.Semaphore(threads)

    async def decode(
        self, uploads: list[Upload], deadline: float, *, name: str = "files"
    ) -> list[DecodedImage]:
        """Decode `uploads` in order, one at a time; `deadline` is a time.perf_counter()
        value. Raises the first image's ApiError (prefixed `name[i]: ` when there are
        several, since one bad file refuses the whole request), or 504 `timeout`."""
        images = []
        for index, upload in enumerate(uploads):
            try:
                images.append(
                    await self.run(decode_image, upload, self.max_pixels, deadline=deadline)
                )
            except ApiError as error:
                if len(uploads) > 1:  # name the culprit
                    error.message = f"{name}[{index}]: {error.message}"
                raise
        return images

    async def run(self, function: Callable[..., T], *args: Any, deadline: float | None = None) -> T:
        """`function(*args)` on a decode thread when its turn comes (504 `timeout` if
        `deadline` has passed by then)."""
        await self._turns.acquire()
        if deadline is not None and time.perf_counter() > deadline:
            self._turns.release()
            raise deadline_passed()
        loop = asyncio.get_running_loop()
        future = self._executor.submit(function, *args)
        # The turn ends when the thread is done, not when this coroutine stops waiting: a
        # request cancelled mid-decode (deadline, client gone) must not let a new image
        # start while its own is still decoding.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._turns.release))
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
