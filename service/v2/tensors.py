"""This model's tensors in the Open Inference Protocol: what it takes and gives, inference
request bodies in, response bodies out. Plain blocking code without I/O (the route runs the
parsing on the decode threads); every mistake in a request is an ApiError 400.

Inputs (a request sends exactly one of them, N images, 1 <= N <= max_files):
    image              BYTES [N]           encoded image files, decoded like /predict
    pixels             UINT8 [N, 32, 32, 3] RGB, height x width x channel, 0..255
    normalized_pixels  FP32  [N, 3, 32, 32] RGB, channel first, (x / 255 - mean) / std
Output:
    probabilities      FP32  [N, classes]   softmax; with the classification extension
                                            BYTES [N, k] of "score:index:label", best first

Tensor data comes as JSON (`data`, flat or nested, row-major) or, with Triton's binary
tensor data extension, as raw little-endian bytes after the JSON object: the
`Inference-Header-Content-Length` header gives the JSON's length and each input's
`parameters.binary_data_size` its share of the rest. A BYTES element is a 4-byte
little-endian length and the bytes in binary form; in JSON it is a string, so an image
travels there as base64 text. Sources: kserve/kserve docs/predict-api/v2/required_api.md;
Triton's docs/protocol/extension_binary_data.md and extension_classification.md.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from model.preprocessing import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE
from service.errors import ApiError
from service.v2.schemas import (
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelMetadata,
    Parameters,
    ParameterValue,
    RequestInput,
    ResponseOutput,
)

# The protocol's data types and their sizes in bytes (BYTES elements vary in size).
DATATYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
    "BF16": 2,
    "BYTES": 0,
}

# A BYTES element in binary form: its length as a 4-byte little-endian unsigned integer.
_LENGTH = struct.Struct("<I")

# Half an 8-bit level: how far a normalised value may sit from the 8-bit grid's ends
# (0 and 255) and still count as a pixel; more means another normalisation was used.
_LEVEL_TOLERANCE = 0.5


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as model metadata states it (-1: the batch dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str

    def metadata(self) -> MetadataTensor:
        return MetadataTensor(
            name=self.name,
            datatype=self.datatype,
            shape=list(self.shape),
            parameters={"description": self.description},
        )

    def shape_text(self) -> str:
        return "[" + ", ".join("N" if d == -1 else str(d) for d in self.shape) + "]"


IMAGE = TensorSpec(
    "image",
    "BYTES",
    (-1,),
    "Encoded image files (PNG, JPEG, BMP, WebP, GIF, TIFF), one per element, decoded, "
    "resized on the short side to 32 px and centre-cropped like /predict. Raw file bytes in "
    "the binary tensor data form; base64 text in JSON `data`.",
)
PIXELS = TensorSpec(
    "pixels",
    "UINT8",
    (-1, IMAGE_SIZE, IMAGE_SIZE, 3),
    "RGB pixels 0..255, height x width x channel (numpy's and PIL's layout), already 32x32.",
)
NORMALIZED_PIXELS = TensorSpec(
    "normalized_pixels",
    "FP32",
    (-1, 3, IMAGE_SIZE, IMAGE_SIZE),
    "RGB, channel first, normalised as (x / 255 - mean) / std with the CIFAR-10 mean "
    f"{list(CIFAR10_MEAN)} and std {list(CIFAR10_STD)} (torchvision ToTensor then Normalize). "
    "The engines take 8-bit pixels, so each value is mapped to the nearest of the 256 levels: "
    "exact for tensors made from 8-bit images; values more than half a level outside 0..255 "
    "are refused.",
)
INPUTS: dict[str, TensorSpec] = {spec.name: spec for spec in (IMAGE, PIXELS, NORMALIZED_PIXELS)}
OUTPUT_NAME = "probabilities"


def probabilities_spec(num_classes: int) -> TensorSpec:
    return TensorSpec(
        OUTPUT_NAME,
        "FP32",
        (-1, num_classes),
        "Softmax probability of each class, in the order of the model's classes. With "
        "parameters.classification = k: BYTES [N, k] strings 'score:index:label', best first.",
    )


def model_metadata(name: str, version: str, platform: str, classes: Sequence[str]) -> ModelMetadata:
    return ModelMetadata(
        name=name,
        versions=[version],
        platform=platform,
        inputs=[spec.metadata() for spec in INPUTS.values()],
        outputs=[probabilities_spec(len(classes)).metadata()],
        parameters={
            "inputs": "send exactly one of the inputs per request",
            "classes": ",".join(classes),
        },
    )


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputChoice:
    """How one output is wanted: binary or JSON, the tensor or its top-k classification."""

    name: str
    binary: bool
    classification: int = 0  # k of the classification extension; 0: the tensor itself


@dataclass(frozen=True)
class DecodedRequest:
    """An inference request, checked: N images as encoded files (input `image`) or as
    uint8 (3, 32, 32) tensors (the other inputs), and the outputs wanted."""

    id: str | None
    input: TensorSpec
    count: int
    encoded: list[bytes]
    pixels: list[torch.Tensor]
    outputs: list[OutputChoice]


def _bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON object and the binary data after it (Inference-Header-Content-Length)."""
    if header_length is None:
        return body, b""
    value = header_length.strip()
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= len(body):
        raise _bad(
            "invalid_header_length",
            f"Inference-Header-Content-Length is {header_length!r}; it must be the length in "
            f"bytes of the JSON object at the start of the {len(body)}-byte body",
        )
    return body[: int(value)], body[int(value) :]


def _parse(json_part: bytes) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate_json(json_part)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise _bad("invalid_request", f"the inference request is not valid: {message}") from None


def _parameter(
    parameters: Parameters | None, key: str, kind: type, where: str
) -> ParameterValue | None:
    """A parameter of the expected JSON type (bool is not an int here), or None if absent."""
    value = (parameters or {}).get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(
            "invalid_parameter",
            f"{where} parameter {key!r} must be a {kind.__name__}, not {value!r}",
        )
    return value


def _refuse_shared_memory(parameters: Parameters | None, where: str) -> None:
    if any(key.startswith("shared_memory") for key in parameters or {}):
        raise _bad(
            "unsupported", f"{where}: shared memory is not supported; send the data in the body"
        )


def _check_input(given: RequestInput, max_images: int) -> tuple[TensorSpec, int]:
    """The input's spec and its batch size N, or a 400 naming what to send instead."""
    choices = ", ".join(f"{s.name} ({s.datatype} {s.shape_text()})" for s in INPUTS.values())
    spec = INPUTS.get(given.name)
    if spec is None:
        raise _bad("unknown_input", f"the model has no input {given.name!r}; send one of {choices}")
    if given.datatype != spec.datatype:
        raise _bad(
            "wrong_datatype",
            f"input {spec.name!r} has datatype {spec.datatype}, not {given.datatype!r}",
        )
    shape = given.shape
    if len(shape) != len(spec.shape) or any(
        want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
    ):
        raise _bad(
            "wrong_shape",
            f"input {spec.name!r} has shape {spec.shape_text()}, not {shape}",
        )
    count = shape[0]
    if count < 1:
        raise _bad("wrong_shape", f"input {spec.name!r} must hold at least one image, not {count}")
    if count > max_images:
        raise _bad(
            "too_many_images",
            f"at most {max_images} images per request; input {spec.name!r} holds {count}",
        )
    return spec, count


def _binary_elements(raw: bytes, count: int, where: str) -> list[bytes]:
    """BYTES elements in binary form: each a 4-byte little-endian length, then the bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise _bad("invalid_binary_data", f"{where}: the data ends inside an element length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise _bad(
                "invalid_binary_data",
                f"{where}[{len(elements)}]: its length says {length} bytes, but only "
                f"{len(raw) - offset} remain",
            )
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise _bad(
            "invalid_binary_data",
            f"{where}: the binary data holds {len(elements)} elements; the shape says {count}",
        )
    return elements


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_images(data: list[Any], count: int, where: str) -> list[bytes]:
    """BYTES elements in JSON: strings, here base64 text of image files."""
    elements = _flatten(data)
    if len(elements) != count:
        raise _bad(
            "wrong_shape", f"{where}: `data` holds {len(elements)} elements; the shape says {count}"
        )
    images = []
    for index, element in enumerate(elements):
        if not isinstance(element, str):
            raise _bad(
                "invalid_data", f"{where}[{index}]: a BYTES element in JSON must be a string"
            )
        try:
            images.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(
                "invalid_data",
                f"{where}[{index}]: not base64; in JSON an image travels as base64 text "
                "(or send raw bytes with the binary tensor data extension)",
            ) from None
    return images


def _json_numbers(data: list[Any], spec: TensorSpec, count: int) -> np.ndarray:
    """JSON `data` of a numeric input as a flat array, checked for type and size."""
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):
        raise _bad(
            "invalid_data", f"input {spec.name!r}: `data` is not a regular array of numbers"
        ) from None
    kinds = "iu" if spec.datatype == "UINT8" else "iuf"
    if array.dtype.kind not in kinds:
        wanted = "integers" if spec.datatype == "UINT8" else "numbers"
        raise _bad("invalid_data", f"input {spec.name!r}: `data` must hold {wanted} only")
    expected = count * int(np.prod(spec.shape[1:]))
    if array.size != expected:
        raise _bad(
            "wrong_shape",
            f"input {spec.name!r}: `data` holds {array.size} elements; shape says {expected}",
        )
    if spec.datatype == "UINT8" and array.size and (array.min() < 0 or array.max() > 255):
        raise _bad("invalid_data", f"input {spec.name!r}: UINT8 values must be 0..255")
    return array.reshape(-1)


def _binary_numbers(raw: bytes, spec: TensorSpec, count: int) -> np.ndarray:
    expected = count * int(np.prod(spec.shape[1:])) * DATATYPE_SIZES[spec.datatype]
    if len(raw) != expected:
        raise _bad(
            "invalid_binary_data",
            f"input {spec.name!r}: binary_data_size is {len(raw)} bytes; the shape and "
            f"datatype need {expected}",
        )
    return np.frombuffer(raw, dtype="<f4" if spec.datatype == "FP32" else np.uint8)


def _to_levels(values: np.ndarray) -> np.ndarray:
    """Normalised (N, 3, H, W) values -> uint8 pixels, by inverting (x / 255 - mean) / std."""
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD, dtype=np.float64).reshape(1, 3, 1, 1)
    levels = (values.astype(np.float64) * std + mean) * 255.0
    low, high = -_LEVEL_TOLERANCE, 255.0 + _LEVEL_TOLERANCE
    if not np.isfinite(levels).all() or levels.min() < low or levels.max() > high:
        raise _bad(
            "invalid_data",
            f"input {NORMALIZED_PIXELS.name!r}: values lie outside the range of 8-bit pixels "
            f"normalised with the CIFAR-10 mean {list(CIFAR10_MEAN)} and std "
            f"{list(CIFAR10_STD)}; normalise (x / 255 - mean) / std with these",
        )
    return np.rint(levels).clip(0, 255).astype(np.uint8)


def _to_pixels(flat: np.ndarray, spec: TensorSpec, count: int) -> list[torch.Tensor]:
    """A flat numeric array of a pixel input -> uint8 (3, 32, 32) tensors, one per image."""
    if spec is PIXELS:
        hwc = flat.astype(np.uint8, copy=False).reshape(count, IMAGE_SIZE, IMAGE_SIZE, 3)
        chw = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    else:
        chw = _to_levels(flat.reshape(count, 3, IMAGE_SIZE, IMAGE_SIZE))
    return list(torch.from_numpy(chw).unbind(0))


def _output_choices(request: InferenceRequest, num_classes: int) -> list[OutputChoice]:
    _refuse_shared_memory(request.parameters, "the request")
    default_binary = bool(
        _parameter(request.parameters, "binary_data_output", bool, "the request's")
    )
    if request.outputs is None:
        return [OutputChoice(OUTPUT_NAME, default_binary)]
    choices: list[OutputChoice] = []
    for output in request.outputs:
        where = f"output {output.name!r}"
        if output.name != OUTPUT_NAME:
            raise _bad(
                "unknown_output",
                f"the model has no output {output.name!r}; ask for {OUTPUT_NAME!r}",
            )
        if any(choice.name == output.name for choice in choices):
            raise _bad("invalid_request", f"{where} is asked for twice")
        _refuse_shared_memory(output.parameters, where)
        binary = _parameter(output.parameters, "binary_data", bool, where)
        k = _parameter(output.parameters, "classification", int, where)
        if k is not None and not 1 <= int(k) <= num_classes:
            raise _bad(
                "invalid_parameter",
                f"{where}: classification must be between 1 and {num_classes}, not {k}",
            )
        choices.append(
            OutputChoice(
                output.name, default_binary if binary is None else bool(binary), int(k or 0)
            )
        )
    return choices


def decode_request(
    body: bytes, header_length: str | None, *, max_images: int, num_classes: int
) -> DecodedRequest:
    """Parse and check an inference request body (JSON, optionally followed by binary tensor
    data whose JSON length `header_length` gives). Raises ApiError 400 on any mistake."""
    json_part, binary = _split_body(body, header_length)
    request = _parse(json_part)
    if len(request.inputs) != 1:
        names = ", ".join(INPUTS)
        raise _bad(
            "wrong_inputs",
            f"send exactly one input per request (one of {names}), not {len(request.inputs)}",
        )
    given = request.inputs[0]
    spec, count = _check_input(given, max_images)
    where = f"input {spec.name!r}"
    _refuse_shared_memory(given.parameters, where)
    size = _parameter(given.parameters, "binary_data_size", int, where)
    if size is not None and given.data is not None:
        raise _bad("invalid_request", f"{where} has both `data` and binary_data_size; send one")
    if len(binary) != (size or 0):
        raise _bad(
            "invalid_binary_data",
            f"the body has {len(binary)} bytes after the JSON object; binary_data_size of "
            f"{where} says {size or 0}",
        )
    if size is None and given.data is None:
        raise _bad(
            "invalid_request",
            f"{where} has no data: give `data`, or binary data after the JSON with "
            "parameters.binary_data_size",
        )
    encoded: list[bytes] = []
    pixels: list[torch.Tensor] = []
    if spec is IMAGE:
        encoded = (
            _binary_elements(binary, count, spec.name)
            if size is not None
            else _json_images(given.data or [], count, spec.name)
        )
    else:
        flat = (
            _binary_numbers(binary, spec, count)
            if size is not None
            else _json_numbers(given.data or [], spec, count)
        )
        pixels = _to_pixels(flat, spec, count)
    return DecodedRequest(
        id=request.id,
        input=spec,
        count=count,
        encoded=encoded,
        pixels=pixels,
        outputs=_output_choices(request, num_classes),
    )


# --- responses -----------------------------------------------------------------------------


def _bytes_tensor(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def _top_k(probabilities: np.ndarray, k: int, classes: Sequence[str]) -> list[list[str]]:
    """Each row's k best classes as "score:index:label", best first (ties: lower index)."""
    rows = []
    for row in probabilities:
        best = np.argsort(-row, kind="stable")[:k]
        rows.append([f"{row[i]!s}:{i}:{classes[i]}" for i in best])
    return rows


def encode_response(
    request: DecodedRequest,
    probabilities: np.ndarray,
    *,
    model_name: str,
    model_version: str,
    classes: Sequence[str],
) -> tuple[bytes, int | None]:
    """The response body for float32 `probabilities` (N, classes), and the JSON object's
    length when binary tensor data follows it (for Inference-Header-Content-Length)."""
    outputs: list[ResponseOutput] = []
    chunks: list[bytes] = []
    for choice in request.outputs:
        count = probabilities.shape[0]
        if choice.classification:
            labels = _top_k(probabilities, choice.classification, classes)
            shape, datatype = [count, choice.classification], "BYTES"
            data: list[Any] = [label for row in labels for label in row]
            raw = _bytes_tensor([label.encode() for label in data]) if choice.binary else b""
        else:
            shape, datatype = list(probabilities.shape), "FP32"
            data = probabilities.reshape(-1).tolist()
            raw = probabilities.astype("<f4").tobytes() if choice.binary else b""
        if choice.binary:
            chunks.append(raw)
            outputs.append(
                ResponseOutput(
                    name=choice.name,
                    shape=shape,
                    datatype=datatype,
                    parameters={"binary_data_size": len(raw)},
                )
            )
        else:
            outputs.append(
                ResponseOutput(name=choice.name, shape=shape, datatype=datatype, data=data)
            )
    header = (
        InferenceResponse(
            model_name=model_name, model_version=model_version, id=request.id, outputs=outputs
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
