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

Each hand-over to a thread costs a round trip of the GIL and two thread wake-ups: more CPU
than decoding a thumbnail takes. So small images (at most `inline_max_pixels` pixels, read
from the header, and `INLINE_MAX_BYTES` bytes) decode on the event loop itself, each too
quick to hold anyone up; the loop is let go between them. Anything larger takes its turn
on the threads as above.
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

# Past this size an upload goes to the threads whatever its pixel count: the bytes of a
# small image with large metadata still take time to parse.
INLINE_MAX_BYTES = 64 * 1024


def deadline_passed() -> ApiError:
    return ApiError(504, "timeout", "the deadline passed before every image was decoded")


class DecodePool:
    """`threads` decoding threads that requests share image by image, in arrival order;
    images of at most `inline_max_pixels` pixels (capped at `max_pixels`; 0: none) decode
    on the event loop instead."""

    def __init__(self, threads: int, max_pixels: int, inline_max_pixels: int = 0) -> None:
        self.max_pixels = max_pixels
        self.inline_max_pixels = min(inline_max_pixels, max_pixels)
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
                if time.perf_counter() > deadline:
                    raise deadline_passed()
                image = self.decode_small(upload)
                if image is None:
                    image = await self.run(decode_image, upload, self.max_pixels, deadline=deadline)
                elif index + 1 < len(uploads):
                    await asyncio.sleep(0)  # let other requests run between inline images
                images.append(image)
            except ApiError as error:
                if len(uploads) > 1:  # name the culprit
                    error.message = f"{name}[{index}]: {error.message}"
                raise
        return images

    def decode_small(self, upload: Upload) -> DecodedImage | None:
        """`upload` decoded here, on the event loop, if it is small; None if it is not (or
        inline decoding is off). Raises decode_image's ApiError for a small bad image."""
        if not self.inline_max_pixels or len(upload.data) > INLINE_MAX_BYTES:
            return None
        try:
            return decode_image(upload, self.inline_max_pixels)
        except ApiError as error:
            if error.code == "too_many_pixels":
                return None  # over the inline limit, not necessarily over max_pixels
            raise

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
