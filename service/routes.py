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


def _upload_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI for a multipart body; the routes read it themselves (see service.images), so
    FastAPI cannot infer it, but /docs should still offer a file picker."""
    binary = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": binary} if many else binary
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {field: schema},
                        "required": [field],
                    }
                }
            },
        }
    }


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


_PREDICT_ERRORS = _errors(400, 413, 415, 422, 429, 500, 503, 504)

predict_router = APIRouter(tags=["predict"])
health_router = APIRouter(tags=["health"])


@predict_router.post(
    "/predict",
    response_model=Prediction,
    summary="Classify one image",
    responses=_PREDICT_ERRORS,
    openapi_extra=_upload_body("file", many=False),
)
async def predict(request: Request, service: ServiceDep) -> Prediction:
    """Multipart field `file`: PNG, JPEG, BMP, WebP, GIF (first frame) or TIFF, any mode and
    size (resized on the short side to 32 px, antialiased, then centre-cropped)."""
    [prediction] = await service.predict(request, field="file", max_files=1)
    return prediction


@predict_router.post(
    "/predict/batch",
    response_model=BatchPrediction,
    summary="Classify several images",
    responses=_PREDICT_ERRORS,
    openapi_extra=_upload_body("files", many=True),
)
async def predict_batch(request: Request, service: ServiceDep) -> BatchPrediction:
    """Repeated multipart field `files` (at most max_files). Answers in upload order. One bad
    file refuses the whole request, with its index in the message (`files[2]: ...`)."""
    predictions = await service.predict(
        request, field="files", max_files=service.settings.max_files
    )
    return BatchPrediction(predictions=predictions)


@health_router.get(
    "/health",
    response_model=Health,
    summary="Readiness",
    responses={503: {"model": Health, "description": "Starting, failed to load, or draining."}},
)
async def health(service: ServiceDep) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 while starting ("starting"), when
    loading failed ("failed") or while shutting down ("draining")."""
    engine = service.batcher.engine if service.batcher.loaded else None
    body = Health(
        status=service.state,
        model_name=service.model_name or None,
        model_version=service.model_version or None,
        engine=engine.name if engine else None,
        device=engine.device if engine else None,
        mirror_tta=service.batcher.mirror_tta,
        max_batch_size=service.settings.max_batch_size,
        max_wait_ms=service.settings.max_wait_ms,
        queue_size=service.settings.queue_size,
        queue_depth=service.batcher.depth,
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
