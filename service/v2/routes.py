"""The Open Inference Protocol's REST routes (KServe v2), beside /predict.

Thin, like service.routes: each one checks the model name and version in its path and hands
over to the Service (shared with /predict) or to service.v2.inference. Errors take the
protocol's shape, {"error": "<message>"} (see service.errors), with the status that fits:
404 for an unknown model or version, 400 for a request that breaks the protocol or the
model's tensors, the /predict codes for image files and limits.

Health answers follow the protocol too: 200 for true, 400 for false, no body.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from service.errors import ApiError
from service.routes import get_service
from service.runtime import Service
from service.v2.inference import HEADER_LENGTH, infer
from service.v2.schemas import (
    InferenceErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
)
from service.v2.tensors import model_metadata

EXTENSIONS = ["binary_tensor_data", "classification"]

# Platform names are "<framework>_<format>" (the protocol's list, with Triton's names).
PLATFORMS = {
    "torch": "pytorch_safetensors",
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino_ir",
}

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])

ServiceDep = Annotated[Service, Depends(get_service)]


def _model(service: Service, name: str, version: str | None) -> Service:
    if name != service.model_name:
        raise ApiError(
            404,
            "unknown_model",
            f"unknown model {name!r}; this server serves {service.model_name!r}",
        )
    if version is not None and version != service.model_version:
        raise ApiError(
            404,
            "unknown_version",
            f"model {name!r} has no version {version!r}; it has {service.model_version!r}",
        )
    return service


async def model_any_version(model_name: str, service: ServiceDep) -> Service:
    return _model(service, model_name, None)


async def model_at_version(model_name: str, model_version: str, service: ServiceDep) -> Service:
    return _model(service, model_name, model_version)


ModelDep = Annotated[Service, Depends(model_any_version)]
VersionDep = Annotated[Service, Depends(model_at_version)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": InferenceErrorResponse} for status in statuses}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its nested models written in place: an OpenAPI request
    body given by hand cannot point into pydantic's own `$defs`."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


_INFER_DOCS: dict[str, Any] = {
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "Binary tensor data extension: the length of the JSON object at "
            "the start of the body; the inputs' binary data follow it.",
            "schema": {"type": "integer", "minimum": 1},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline(InferenceRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "The JSON inference request, then the inputs' binary data "
                f"(with {HEADER_LENGTH}).",
            },
        },
    },
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": "The outputs: JSON, or with binary outputs the JSON inference "
        f"response followed by their bytes ({HEADER_LENGTH} gives the JSON's length).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **_errors(400, 404, 413, 415, 422, 429, 500, 503, 504),
}
_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "True."},
    400: {"description": "False: the service is starting or draining."},
}
_READY_RESPONSES = {**_HEALTH_RESPONSES, **_errors(404)}


def _health(truth: bool) -> Response:
    return Response(status_code=200 if truth else 400)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(
        name=request.app.title, version=request.app.version, extensions=EXTENSIONS
    )


@router.get(
    "/health/live",
    summary="Server live",
    response_class=Response,
    responses=_HEALTH_RESPONSES,
)
async def server_live() -> Response:
    """200 whenever the process can answer at all (like /health/live)."""
    return _health(True)


@router.get(
    "/health/ready",
    summary="Server ready",
    response_class=Response,
    responses=_HEALTH_RESPONSES,
)
async def server_ready(request: Request) -> Response:
    """200 once the model is loaded and warmed up; 400 while starting or draining (where
    /health says 503: the protocol answers false with a 4xx)."""
    service: Service | None = getattr(request.app.state, "service", None)
    return _health(service is not None and service.state == "ready")


@router.get(
    "/models/{model_name}",
    response_model=ModelMetadata,
    summary="Model metadata",
    responses=_errors(404, 503),
)
async def model(service: ModelDep) -> ModelMetadata:
    return _metadata(service)


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    summary="Model metadata, by version",
    responses=_errors(404, 503),
)
async def model_version(service: VersionDep) -> ModelMetadata:
    return _metadata(service)


def _metadata(service: Service) -> ModelMetadata:
    engine = service.engine.name
    return model_metadata(
        service.model_name,
        service.model_version,
        PLATFORMS.get(engine, engine),
        service.classes,
    )


@router.get(
    "/models/{model_name}/ready",
    summary="Model ready",
    response_class=Response,
    responses=_READY_RESPONSES,
)
async def model_ready(service: ModelDep) -> Response:
    return _health(service.state == "ready")


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    summary="Model ready, by version",
    response_class=Response,
    responses=_READY_RESPONSES,
)
async def model_version_ready(service: VersionDep) -> Response:
    return _health(service.state == "ready")


@router.post(
    "/models/{model_name}/infer",
    summary="Inference",
    response_model=None,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOCS,
)
async def model_infer(request: Request, service: ModelDep) -> Response:
    """Send exactly one input: `image` (BYTES [N], encoded files), `pixels` (UINT8
    [N, 32, 32, 3]) or `normalized_pixels` (FP32 [N, 3, 32, 32]); N at most max_files. The
    output `probabilities` is FP32 [N, classes], or with `parameters.classification = k`
    BYTES [N, k] strings "score:index:label"."""
    return await infer(request, service)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    summary="Inference, by version",
    response_model=None,
    responses=_INFER_RESPONSES,
    openapi_extra=_INFER_DOCS,
)
async def model_version_infer(request: Request, service: VersionDep) -> Response:
    """As /v2/models/{model_name}/infer, for the version given (the weights' SHA-256 prefix)."""
    return await infer(request, service)
