"""From request bytes to model input: read multipart uploads within limits, decode images.

Reading streams the body through python-multipart's parser and stops at the first byte
over `max_upload_bytes` (or at once, from Content-Length), so an oversized upload is never
buffered whole. Files stay in memory: the size limit bounds them, and no temporary files
or thread hops are needed.

Decoding opens the image lazily (Pillow reads only the header), refuses too many pixels
before any pixel is decoded (decompression bombs), then decodes the first frame to RGB
(`model.preprocessing.to_rgb`: transparency over white), applies the EXIF orientation and
hands it to `model.preprocessing.image_to_tensor`, the same code training uses. It is
plain blocking code: service.decoding runs it on the decode threads (small PNGs and JPEGs,
without the retries, on the event loop).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from model.preprocessing import image_to_tensor, to_rgb
from service.containers import (
    JPEG_EOI,
    JPEG_SOI,
    PNG_SIGNATURE,
    jpeg_pixels_only,
    jpeg_scans_cover_the_image,
    png_pixels_only,
    png_without_text,
)
from service.errors import ApiError

logger = logging.getLogger("service")

# Pillow's names for the formats the service accepts. MPO is how Pillow reports the JPEG
# files many phone cameras write (a JPEG with extra preview frames).
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
_FORMATS_FOR_PEOPLE = "PNG, JPEG, BMP, WebP, GIF or TIFF"


@dataclass(frozen=True)
class Upload:
    """One file from a multipart request."""

    filename: str | None
    data: bytes


@dataclass(frozen=True)
class DecodedImage:
    """An upload turned into model input, with what the response reports about it."""

    pixels: torch.Tensor  # uint8 (3, 32, 32)
    filename: str | None
    format: str
    mode: str
    width: int
    height: int
    decode_ms: float


class _PartCollector:
    """python-multipart callbacks that keep the parts named `field`, at most `max_files`."""

    def __init__(self, field: str, max_files: int) -> None:
        self.field = field
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._data: bytearray | None = None
        self._filename: str | None = None

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._data = None
        self._filename = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name", b"").decode("utf-8", "replace") != self.field:
            return  # another field: its bytes count against the size limit, nothing more
        if len(self.uploads) >= self.max_files:
            raise ApiError(
                400,
                "too_many_files",
                f"at most {self.max_files} file(s) per request in field {self.field!r}",
            )
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        self._data = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._data is not None:
            self.uploads.append(Upload(self._filename, bytes(self._data)))
            self._data = None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "upload_too_large", f"the request body exceeds {max_bytes} bytes")


async def read_uploads(
    request: Request, *, field: str, max_files: int, max_bytes: int
) -> list[Upload]:
    """The files sent in multipart field `field`, in upload order; ApiError on any misuse."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(
            415,
            "not_multipart",
            f"send the image as multipart/form-data in field {field!r} (curl -F {field}=@cat.png)",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "the multipart Content-Type has no boundary")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)  # refused before a byte of the body is read

    collector = _PartCollector(field, max_files)
    received = 0
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": collector.on_part_begin,
                "on_header_field": collector.on_header_field,
                "on_header_value": collector.on_header_value,
                "on_header_end": collector.on_header_end,
                "on_headers_finished": collector.on_headers_finished,
                "on_part_data": collector.on_part_data,
                "on_part_end": collector.on_part_end,
            },
        )
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)  # chunked or lying Content-Length: stop reading
            parser.write(chunk)
        parser.finalize()
    except FormParserError as error:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body is malformed: {error}"
        ) from None
    except ClientDisconnect:
        raise ApiError(499, "client_closed_request", "the client closed the connection") from None
    if parser.state != MultipartState.END:
        # The body stopped early: no opening boundary, inside a part's headers, or a part
        # never closed. The parser raises only for bytes it cannot read, not for an end it
        # did not reach, and an unclosed part's data never reaches on_part_end: without
        # this check a file that was sent would be reported as missing.
        raise ApiError(
            400,
            "invalid_multipart",
            "the multipart body ends before its closing boundary "
            f"'--{boundary.decode('latin-1')}--'; send the whole body",
        )
    if not collector.uploads:
        raise ApiError(400, "missing_file", f"no file in multipart field {field!r}")
    return collector.uploads


def _unidentified(data: bytes) -> ApiError:
    """Tell an image in a format we do not take from something that is no image at all."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # identification only: nothing decoded
            found = image.format
    except Exception:  # whatever fails here, the bytes are no image we could name
        found = None
    if found:
        return ApiError(
            415,
            "unsupported_format",
            f"{found} images are not supported; send {_FORMATS_FOR_PEOPLE}",
        )
    return ApiError(
        415, "not_an_image", f"the file is not an image in a known format ({_FORMATS_FOR_PEOPLE})"
    )


# EXIF orientation (tag 0x0112) -> the transpose that makes the pixels upright (EXIF 2.32,
# section 4.6.4; the same table as PIL.ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION = 0x0112


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 (upright) when there is none or it is unreadable:
    metadata never makes an image unreadable, so a broken EXIF block means no rotation."""
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except Exception as error:  # Pillow's EXIF and XMP parsers raise many types
        logger.debug("unreadable EXIF ignored: %r", error)
        return 1


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ApiError:
    return ApiError(
        413,
        "too_many_pixels",
        f"the image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
    )


Decoded = tuple[Image.Image, str, str, int, int]  # RGB, format, mode, width, height


def _decode_rgb(data: bytes, max_pixels: int) -> Decoded:
    """Bytes -> the first frame as upright RGB (transparency over white, EXIF orientation
    applied), with the format, mode and size as uploaded. ApiError for anything wrong."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Image.DecompressionBombError as error:
        raise ApiError(413, "too_many_pixels", str(error)) from None
    except Exception as error:  # plugins raise many types for a bad header; see below
        raise ApiError(422, "corrupt_image", f"the image header is unreadable: {error}") from None
    # No `with image:` (it would close the image that to_rgb may return as it is); the
    # BytesIO behind it holds no OS resource.
    width, height = image.size
    fmt, mode = image.format or "unknown", image.mode
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, max_pixels)
    if width == 0 or height == 0:
        raise ApiError(422, "corrupt_image", f"the image is {width}x{height} pixels")
    try:
        # to_rgb decodes the first frame (of animations and multi-page TIFFs) itself:
        # a PNG colour key is matched at the file's bit depth before Pillow reduces it.
        rgb = to_rgb(image)
        method = _TRANSPOSE.get(_orientation(image))  # phones store rotated pixels
        rgb = rgb if method is None else rgb.transpose(method)
        rgb.load()
    except Image.DecompressionBombError as error:
        raise ApiError(413, "too_many_pixels", str(error)) from None
    except Exception as error:
        # Pillow's decoders raise many types for malformed or truncated data (OSError,
        # SyntaxError, ValueError, EOFError, struct.error, ...): with untrusted bytes,
        # every one of them is the upload's fault, and must not become a 500.
        logger.debug("decode failed: %r", error)
        raise ApiError(
            422, "corrupt_image", f"the image data is corrupt or truncated: {error}"
        ) from None
    return rgb, "JPEG" if fmt == "MPO" else fmt, mode, width, height


# Bytes put between a JPEG that lacks its end marker and the marker appended to it: a scan
# whose data is whole ignores them (libjpeg skips bytes before a marker), a scan cut short
# decodes them as more data. 0xAA and 0x55 differ from each other, and from the zero bits
# libjpeg puts in place of missing data, in every bit; neither is 0xFF, which would read
# as a marker.
_JPEG_PROBES = (b"\xaa" * 64, b"\x55" * 64)


def _jpeg_completed(data: bytes, max_pixels: int) -> Decoded:
    """A JPEG without its 2-byte end-of-image marker, if all its pixel data is there.

    Two checks (a JPEG cut anywhere else stays a 422): the scans present must carry every
    component and coefficient to full precision (`jpeg_scans_cover_the_image`: a
    progressive JPEG cut between scans fails it), and the last scan's data must be whole,
    which shows in the decoder: with the marker appended directly or after other bytes,
    a whole scan decodes to the same pixels, a cut one does not."""
    data = data.rstrip(b"\xff")  # the first byte of a half-written marker
    if not jpeg_scans_cover_the_image(data):
        raise ApiError(422, "corrupt_image", "the JPEG is cut off: its scans are incomplete")
    completed = _decode_rgb(data + JPEG_EOI, max_pixels)
    expected = np.asarray(completed[0])
    for probe in _JPEG_PROBES:
        other = _decode_rgb(data + probe + JPEG_EOI, max_pixels)[0]
        if not np.array_equal(np.asarray(other), expected):
            raise ApiError(
                422, "corrupt_image", "the JPEG is cut off inside its pixel data (no end marker)"
            )
    return completed


def _second_try(data: bytes, error: ApiError, max_pixels: int) -> Decoded:
    """After a failed decode: the pixels without the metadata (which may be what failed),
    then, for a JPEG without its end marker, `_jpeg_completed`. The first error stands when
    neither works (a 413 from either is final)."""
    if data.startswith(PNG_SIGNATURE):
        attempts = [(_decode_rgb, png_pixels_only(data))]
    elif data.startswith(JPEG_SOI):
        stripped = jpeg_pixels_only(data)
        attempts = [(_decode_rgb, stripped)]
        if not data.endswith(JPEG_EOI):
            attempts.append((_jpeg_completed, stripped))
    else:
        raise error
    for decode, attempt in attempts:
        if decode is _decode_rgb and attempt is data:
            continue  # nothing was dropped: these very bytes just failed
        try:
            return decode(attempt, max_pixels)
        except ApiError as retry_error:
            if retry_error.status_code == 413:
                raise
    raise error


def decode_image(upload: Upload, max_pixels: int, *, retry: bool = True) -> DecodedImage:
    """Upload bytes -> uint8 (3, 32, 32) tensor by the documented preprocessing rule.

    Metadata never makes an image unreadable: PNG text and ICC chunks are dropped before
    decoding, and an image that fails is tried once more without its metadata
    (service.containers). A JPEG that lacks only its end marker is completed when all of
    its pixel data is there. Anything else wrong is the ApiError of the first attempt.
    `retry=False` skips those second tries (whose cost the pixel limit does not bound)
    and raises the first attempt's error."""
    started = time.perf_counter()
    if not upload.data:
        raise ApiError(400, "empty_file", "the file is empty")
    data = upload.data
    if data.startswith(PNG_SIGNATURE):
        data = png_without_text(data)
    try:
        rgb, fmt, mode, width, height = _decode_rgb(data, max_pixels)
    except ApiError as error:
        if not retry or error.status_code not in (415, 422):
            raise
        rgb, fmt, mode, width, height = _second_try(data, error, max_pixels)
    return DecodedImage(
        pixels=image_to_tensor(rgb),
        filename=upload.filename,
        format=fmt,
        mode=mode,
        width=width,
        height=height,
        decode_ms=(time.perf_counter() - started) * 1000,
    )
