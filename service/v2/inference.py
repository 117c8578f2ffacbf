"""One Open Inference Protocol inference request, through the same steps as /predict.

admitted (503 draining, 429 over queue_size) -> read the body (413 past
max_upload_bytes) -> parse and check it on the decode threads (400) -> hold places for
all N images (429) -> decode encoded images like /predict (its 4xx codes) -> the shared
batcher, N items in its batches (504, 499) -> the response, JSON or binary.
"""

from __future__ import annotations

import zlib

import numpy as np
from fastapi import Request, Response
from starlette.requests import ClientDisconnect

from service.errors import ApiError
from service.images import Upload
from service.runtime import Service
from service.v2.tensors import IMAGE, DecodedRequest, decode_request, encode_response

HEADER_LENGTH = "Inference-Header-Content-Length"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) from Content-Length or as soon as it grows past
    `max_bytes`, so an oversized body is never buffered whole."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, "upload_too_large", f"the request body exceeds {max_bytes} bytes")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
    except ClientDisconnect:
        raise ApiError(499, "client_closed_request", "the client closed the connection") from None
    return bytes(body)


# Content-Encoding -> zlib's wbits: gzip's container, or zlib's (HTTP's "deflate", RFC 9110,
# and what tritonclient's request_compression_algorithm="deflate" sends).
_WBITS = {"gzip": 31, "deflate": 15}


def _content_encoding(request: Request) -> str | None:
    """The body's compression (None: identity); 415 for one the service cannot undo."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding not in _WBITS:
        raise ApiError(
            415,
            "unsupported_content_encoding",
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or identity",
        )
    return encoding


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Undo gzip or deflate, refusing (413) output past `max_bytes` before it is produced,
    so a small compressed body cannot expand without bound."""
    inflater = zlib.decompressobj(_WBITS[encoding])
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise ApiError(
            400, "invalid_encoding", f"the {encoding} body is corrupt: {error}"
        ) from None
    if len(data) > max_bytes:
        raise ApiError(
            413, "upload_too_large", f"the decompressed request body exceeds {max_bytes} bytes"
        )
    if not inflater.eof:
        raise ApiError(400, "invalid_encoding", f"the {encoding} body is truncated")
    return data


async def infer(request: Request, service: Service) -> Response:
    """Answer one inference request for the service's model (name and version checked by
    the caller)."""
    encoding = _content_encoding(request)
    settings = service.settings
    async with service.admitted() as ticket:
        body = await read_body(request, settings.max_upload_bytes)

        def parse() -> DecodedRequest:
            limit = settings.max_upload_bytes
            plain = body if encoding is None else decompress(body, encoding, limit)
            return decode_request(
                plain,
                request.headers.get(HEADER_LENGTH),
                max_images=settings.max_files,
                num_classes=len(service.classes),
            )

        decoded = await service.preprocess(parse)
        service.admit_more(ticket, decoded.count - 1)
        if decoded.input is IMAGE:
            uploads = [Upload(None, data) for data in decoded.encoded]
            pixels = [
                image.pixels for image in await service.decode(uploads, ticket, name=IMAGE.name)
            ]
        else:
            pixels = decoded.pixels
        results = await service.infer(request, pixels, ticket)
    probabilities = np.asarray([result.output for result in results], dtype=np.float32)
    content, header_length = encode_response(
        decoded,
        probabilities,
        model_name=service.model_name,
        model_version=service.model_version,
        classes=service.classes,
    )
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_length)},
    )
