"""What the web framework costs per request: the event loop's CPU time per /predict through
the service's app against the same work behind a bare ASGI callable.

    python -m benchmarks.app_overhead [--requests 2000] [--concurrency 64] [--rounds 3]

Both sides run in this process, on one event loop, with no HTTP server and no socket:
each request is an ASGI call with a prebuilt multipart body (one of 64 distinct 32x32
PNGs), `--concurrency` of them in flight at a time.

service  the app `python -m service` serves (service.app.create_app): uvicorn's ASGI
         interface and up, so Starlette's and FastAPI's middleware, routing, dependency
         solving and response model, and the service's own request ids, access log (to
         /dev/null, formatted as in production) and Prometheus metrics.
bare     the same `Service.predict` (admission, deadline, multipart parsing, decoding,
         batching, waiting for the answer or the client) called from a plain ASGI
         function that writes the Prediction's JSON itself: what is left without the
         framework and the per-request bookkeeping.

The figure is `time.thread_time()` of the event loop's thread divided by the requests
answered (best of `--rounds`, alternating the sides): CPU time, so the inference thread
and other load on the machine hardly move it. Both sides decode the PNGs on the event
loop (thumbnails do, `inline_decode_max_pixels`), so decoding is in both figures. The
service runs a random ResNet8 on the torch engine (a cheap inference thread), one pass
per image (`mirror_tta` off), batches of up to 64 within 2 ms. The difference is the
most that replacing the framework could save per request; `python -m benchmarks.load`
gives the whole request's CPU time (HTTP parsing, the model and the load client included)
to weigh it against.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from benchmarks.load import BOUNDARY, multipart_bodies, random_weights
from service.__main__ import configure_logging
from service.app import create_app
from service.config import Settings

Call = Callable[[Scope, Receive, Send], Awaitable[None]]


def bare_predict(app: FastAPI) -> Call:
    """POST /predict as a plain ASGI function around the app's Service (after start-up)."""

    async def predict(scope: Scope, receive: Receive, send: Send) -> None:
        service = app.state.service
        [prediction] = await service.predict(Request(scope, receive), field="file", max_files=1)
        body = prediction.model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return predict


async def post(call: Call | ASGIApp, body: bytes) -> int:
    """One POST /predict through `call` as uvicorn would make it; the response status."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
            (b"content-length", b"%d" % len(body)),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    body_sent = False
    answered = asyncio.Event()
    status = 0

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # as uvicorn: the disconnect comes once the response is out
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            answered.set()

    await call(scope, receive, send)
    return status


async def loop_cpu_us(
    call: Call | ASGIApp, bodies: list[bytes], requests: int, concurrency: int
) -> float:
    """Event-loop CPU microseconds per request for `requests` requests through `call`."""
    slots = asyncio.Semaphore(concurrency)

    async def one(index: int) -> int:
        async with slots:
            return await post(call, bodies[index % len(bodies)])

    started = time.thread_time()
    statuses = await asyncio.gather(*(one(i) for i in range(requests)))
    cpu = time.thread_time() - started
    if set(statuses) != {200}:
        raise SystemExit(f"some requests failed: statuses {sorted(set(statuses))}")
    return cpu / requests * 1e6


async def run(args: argparse.Namespace) -> dict[str, float]:
    configure_logging("info")  # the access log as in production, written to /dev/null
    with open(os.devnull, "w") as devnull, tempfile.TemporaryDirectory() as folder:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(devnull)
        settings = Settings(
            weights_path=random_weights(8, Path(folder)),
            engine="torch",
            mirror_tta=False,
            max_batch_size=64,
            max_wait_ms=2,
            queue_size=max(4096, args.concurrency * 2),
            cache_dir=Path(folder),
        )
        app = create_app(settings)
        bodies = multipart_bodies(64, 32)
        async with app.router.lifespan_context(app):
            while app.state.service.state != "ready":
                await asyncio.sleep(0.05)
            sides: dict[str, Call | ASGIApp] = {"service": app, "bare": bare_predict(app)}
            best = {name: float("inf") for name in sides}
            for call in sides.values():  # warm-up: caches, first batches
                await loop_cpu_us(call, bodies, min(args.requests, 500), args.concurrency)
            for _ in range(args.rounds):
                for name, call in sides.items():
                    cpu = await loop_cpu_us(call, bodies, args.requests, args.concurrency)
                    best[name] = min(best[name], cpu)
    return best


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per round and side")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="the best round is kept")
    args = parser.parse_args(argv)
    best = asyncio.run(run(args))
    service, bare = best["service"], best["bare"]
    print(
        f"event-loop CPU per POST /predict, {args.concurrency} in flight, best of "
        f"{args.rounds} rounds of {args.requests}:\n"
        f"  service (FastAPI app)  {service:7.1f} us\n"
        f"  bare ASGI function     {bare:7.1f} us\n"
        f"  ratio {service / bare:.2f}x; the framework and bookkeeping: {service - bare:.1f} us"
    )
    return best


if __name__ == "__main__":
    main()
