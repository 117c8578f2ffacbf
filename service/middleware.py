"""Per-request bookkeeping (request id, one structured log line, Prometheus counts) and
HEAD for every GET route.

Pure ASGI middlewares rather than BaseHTTPMiddleware: they wrap `send` to see the status,
add a header or drop a body, cost next to nothing per request, and never buffer a body.
"""

from __future__ import annotations

import logging
import random
import re
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

access_logger = logging.getLogger("service.access")

# A client's own request id is echoed only if it is short and plain, so it cannot forge
# log lines or blow up a log index; otherwise a fresh one is made.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _route_template(scope: Scope) -> str:
    """The matched route's path template, so that metric labels stay few ("unmatched" for
    404s rather than every path a scanner tries)."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        # A random 128-bit id. Not uuid4(): its os.urandom call releases the GIL, and on a
        # busy box getting the GIL back from the inference thread delays every request.
        request_id = given if _SAFE_REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # if the app raises before answering, the error middleware sends a 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            access_logger.info(
                "%s %s %d %.1fms id=%s",
                scope["method"],
                scope["path"],
                status,
                elapsed * 1000,
                request_id,
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 3),
                        "client": (scope.get("client") or ("", 0))[0],
                    }
                },
            )


class HeadAsGetMiddleware:
    """Answer HEAD on every GET route with the GET response's status and headers and no
    body (RFC 9110, section 9.3.2). Uptime monitors and load balancers probe with HEAD;
    FastAPI registers only the methods a route names, so without this HEAD /health is 405.

    The request runs as GET in the same scope (so the route template and the access log
    see it), and the method is put back to HEAD afterwards for the outer middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # a streamed body: drop every chunk but the last
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        scope["method"] = "GET"
        try:
            await self.app(scope, receive, send_without_body)
        finally:
            scope["method"] = "HEAD"
