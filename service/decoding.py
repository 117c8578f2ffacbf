"""Decoding: small images on the event loop, the others on threads shared fairly.

Decoding is the one step whose cost depends on what a client sends (up to `max_pixels`
per image, `max_files` images per request), so it is where one request could hold up all
the others. Three rules keep that bounded:

- Each request decodes one image at a time, and queues again for the next one. The
  queue is first come, first served (asyncio.Semaphore wakes its waiters in order), so
  requests take turns image by image: a request waits for at most one image of each
  request ahead of it, never for a whole batch of someone else's uploads.
- At most `threads` images are decoded on the threads at once, whoever sent them: memory
  for decoded pixels stays at `threads` images of at most `max_pixels` each (plus one
  small image on the event loop).
- No image starts decoding after its request's deadline has passed: a `/predict/batch`
  that ran out of time stops at the image in hand instead of decoding the rest for
  nobody.

Each hand-over to a thread costs a round trip of the GIL and two thread wake-ups: more CPU
than decoding a thumbnail takes. So small PNGs and JPEGs decode on the event loop itself,
and the loop is let go between them. What bounds that work, since it holds up every
request: the pixel count (at most `inline_max_pixels`, read from the header first), the
bytes (`inline_max_bytes`: what that many RGBA pixels take uncompressed, plus headers, so
there is little room for metadata to parse), two formats whose decoders are plain, and
one attempt only: an image that fails there goes to the threads, which retry it without
its metadata (service.images), so that the error and its cost are the threads'. Anything
else takes its turn on the threads as above.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.containers import JPEG_SOI, PNG_SIGNATURE
from service.errors import ApiError
from service.images import DecodedImage, Upload, decode_image

T = TypeVar("T")

INLINE_FORMATS = (PNG_SIGNATURE, JPEG_SOI)  # the leading bytes of what may decode inline


def inline_max_bytes(inline_max_pixels: int) -> int:
    """The largest upload decoded inline: `inline_max_pixels` RGBA pixels uncompressed,
    plus 4 KiB of headers."""
    return 4 * inline_max_pixels + 4096


def deadline_passed() -> ApiError:
    return ApiError(504, "timeout", "the deadline passed before every image was decoded")


class DecodePool:
    """`threads` decoding threads that requests share image by image, in arrival order;
    images of at most `inline_max_pixels` pixels (capped at `max_pixels`; 0: none) decode
    on the event loop instead."""

    def __init__(self, threads: int, max_pixels: int, inline_max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.inline_max_pixels = min(inline_max_pixels, max_pixels)
        self.inline_max_bytes = inline_max_bytes(self.inline_max_pixels)
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
                image = self.decode_inline(upload)
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

    def decode_inline(self, upload: Upload) -> DecodedImage | None:
        """`upload` decoded here, on the event loop, in one attempt, if it is a small PNG
        or JPEG; None for anything else, and for any failure (the threads then decode it,
        retries included, and give the error). Never raises."""
        data = upload.data
        if not self.inline_max_pixels or len(data) > self.inline_max_bytes:
            return None
        if not data.startswith(INLINE_FORMATS):
            return None  # an empty file as well: the threads answer it
        try:
            return decode_image(upload, self.inline_max_pixels, retry=False)
        except ApiError:
            return None

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
