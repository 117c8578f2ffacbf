"""The HTTP routes: thin, each hands its request to the Service the lifespan built."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.errors import ApiError
from service.runtime import Service
from service.schemas import BatchPrediction, ErrorResponse, Health, Liveness, Prediction


async def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:  # only between app creation and the end of start-up
        raise ApiError(503, "not_ready", "the service is starting", {"Retry-After": "1"})
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


# The formats service.images decodes, as media types; a part's own Content-Type is not
# trusted (the format is read from the bytes), but clients and /docs learn what to send.
IMAGE_MEDIA_TYPES = "image/png, image/jpeg, image/bmp, image/webp, image/gif, image/tiff"


def _upload_body(field: str, max_files: int | None = None) -> dict[str, Any]:
    """OpenAPI for a multipart body; the routes read it themselves (see service.images), so
    FastAPI cannot infer it, but /docs should still offer a file picker. With `max_files`,
    the field repeats: at least one file and at most `max_files`, as the route enforces."""
    binary = {"type": "string", "format": "binary", "minLength": 1}  # empty files: 400
    schema: dict[str, Any] = (
        binary
        if max_files is None
        else {"type": "array", "items": binary, "minItems": 1, "maxItems": max_files}
    )
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {field: schema},
                        "required": [field],
                    },
                    "encoding": {field: {"contentType": IMAGE_MEDIA_TYPES}},
                }
            },
        }
    }


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


_PREDICT_ERRORS = _errors(400, 413, 415, 422, 429, 500, 503, 504)

health_router = APIRouter(tags=["health"])


async def predict(request: Request, service: ServiceDep) -> Prediction:
    """Multipart field `file`: PNG, JPEG, BMP, WebP, GIF (first frame) or TIFF, any mode and
    size (resized on the short side to 32 px, antialiased, then centre-cropped)."""
    [prediction] = await service.predict(request, field="file", max_files=1)
    return prediction


async def predict_batch(request: Request, service: ServiceDep) -> BatchPrediction:
    """Repeated multipart field `files` (at most max_files). Answers in upload order. One bad
    file refuses the whole request, with its index in the message (`files[2]: ...`)."""
    predictions = await service.predict(
        request, field="files", max_files=service.settings.max_files
    )
    return BatchPrediction(predictions=predictions)


def predict_router(max_files: int) -> APIRouter:
    """/predict and /predict/batch, built per app so that the OpenAPI document states the
    app's own max_files."""
    router = APIRouter(tags=["predict"])
    router.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=Prediction,
        summary="Classify one image",
        responses=_PREDICT_ERRORS,
        openapi_extra=_upload_body("file"),
    )
    router.add_api_route(
        "/predict/batch",
        predict_batch,
        methods=["POST"],
        response_model=BatchPrediction,
        summary="Classify several images",
        responses=_PREDICT_ERRORS,
        openapi_extra=_upload_body("files", max_files=max_files),
    )
    return router


@health_router.get(
    "/health",
    response_model=Health,
    summary="Readiness",
    responses={503: {"model": Health, "description": "Starting, failed to load, or draining."}},
)
async def health(service: ServiceDep) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 while starting ("starting"), when
    loading failed ("failed") or while shutting down ("draining")."""
    engine = service.engine if service.loaded else None
    body = Health(
        status=service.state,
        model_name=service.model_name or None,
        model_version=service.model_version or None,
        engine=engine.name if engine else None,
        device=engine.device if engine else None,
        precision=engine.precision if engine else None,
        mirror_tta=service.settings.mirror_tta,
        max_batch_size=service.settings.max_batch_size,
        max_wait_ms=service.settings.max_wait_ms,
        queue_size=service.settings.queue_size,
        queue_depth=service.queue_depth,
    )
    return JSONResponse(body.model_dump(), status_code=200 if service.state == "ready" else 503)


@health_router.get(
    "/health/live",
    response_model=Liveness,
    summary="Liveness",
    responses={503: {"model": Liveness, "description": "The model failed to load."}},
)
async def live(request: Request) -> JSONResponse:
    """200 whenever the process can answer, loading included; 503 only once loading has
    failed, which no amount of waiting mends (`python -m service` then exits with 3)."""
    service: Service | None = getattr(request.app.state, "service", None)
    if service is not None and service.state == "failed":
        return JSONResponse(Liveness(status="failed").model_dump(), status_code=503)
    return JSONResponse(Liveness().model_dump())


@health_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.CONTENT_TYPE)
