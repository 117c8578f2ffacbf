"""Every error the service answers, in one shape: {"error": {"code": ..., "message": ...}}.

Routes raise `ApiError` with a machine-readable code; the handlers below also turn
FastAPI's validation errors, unknown routes and anything unexpected into the same shape, so
a client never has to parse two formats (and never sees a stack trace).

Under /v2 (the Open Inference Protocol, service.v2) the protocol fixes the shape instead:
{"error": "<message>"}, which Triton's and KServe's clients read; the same code travels
beside it as {"error": "<message>", "code": "<code>"}.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("service")


class ApiError(Exception):
    """A failure with an HTTP status, a stable code for programs and a message for people."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers or {}


V2_PREFIX = "/v2"


def is_v2(request: Request) -> bool:
    """Whether the request is for an Open Inference Protocol route (path /v2 or /v2/...)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_response(
    status_code: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    v2: bool = False,
) -> JSONResponse:
    body: dict[str, object] = (
        {"error": message, "code": code} if v2 else {"error": {"code": code, "message": message}}
    )
    return JSONResponse(body, status_code=status_code, headers=headers)


# Codes for statuses that FastAPI/Starlette raise themselves (unknown route, wrong method).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
}


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(
        error.status_code, error.code, error.message, error.headers, v2=is_v2(request)
    )


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    code = _HTTP_CODES.get(error.status_code, "http_error")
    return error_response(
        error.status_code, code, str(error.detail), error.headers, v2=is_v2(request)
    )


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
    return error_response(422, "invalid_request", message, v2=is_v2(request))


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # A bug, not a client mistake: log it with its traceback, answer without one.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        500, "internal_error", "the server failed; the error was logged", v2=is_v2(request)
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
