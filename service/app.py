"""The FastAPI application: `create_app(settings)` wires settings, lifespan, routes, errors.

Start-up and shutdown live in the lifespan: it starts loading the model (on the inference
thread) and warming it up in the background, so that the server opens its port at once and
the health endpoints answer while the model loads; predictions are let in once it is ready.
On the way out it waits until every admitted request is answered before the batcher and its
threads stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from model.engines import Engine, EngineOptions, create_engine
from model.weights import load_checked
from service.config import Settings
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import HeadAsGetMiddleware, RequestContextMiddleware
from service.routes import health_router, predict_router
from service.runtime import Service
from service.v2 import router as v2_router
from service.web import mount_page

logger = logging.getLogger("service")


def engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        device=settings.device,
        precision=settings.precision,
        cache_dir=settings.cache_dir.expanduser(),
        calibration_path=settings.calibration_path.expanduser(),
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        threads=settings.threads,
    )


def load_engine(settings: Settings) -> Engine:
    """Check and load the weights, then build the engine (raises model.weights.WeightsError)."""
    model, card = load_checked(settings.weights_path)
    return create_engine(settings.engine, model, card, engine_options(settings))


async def start(service: Service, settings: Settings) -> None:
    """Load and warm up the service's engine; a failure is logged and leaves the service
    "failed" (/health 503, /health/live 503), never an exception out of the lifespan."""
    try:
        await service.start()
    except Exception:
        logger.exception("start-up failed: the model could not be loaded or warmed up")
        return
    # Move everything start-up created (torch, the engine, ~1e6 objects) out of the
    # garbage collector's view: full collections then stay short under load
    # (the technique of Instagram's gc.freeze, Python 3.7+).
    gc.collect()
    gc.freeze()
    logger.info(
        "ready: %s %s on %s, batches of up to %d within %.1f ms",
        service.model_name,
        service.model_version,
        service.engine.describe(),
        settings.max_batch_size,
        settings.max_wait_ms,
    )


def add_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """HEAD as GET innermost, then CORS (when origins are set), then the request context
    (request id, access log, metrics) outermost. Starlette runs the last added first."""
    app.add_middleware(HeadAsGetMiddleware)
    if settings.cors_origins:
        # Every path, so routes added later (/v2/...) are covered too. Added before the
        # request-context middleware, which therefore wraps it: preflights are logged and
        # counted like any request. No credentials: the API takes no cookies.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            # Not CORS-safelisted, so a front-end could not read them otherwise: the 429
            # back-off and the id to quote in a bug report.
            expose_headers=["Retry-After", "X-Request-ID"],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)


def create_app(
    settings: Settings | None = None,
    engine_factory: Callable[[], Engine] | None = None,
) -> FastAPI:
    """The app. `engine_factory` builds the engine on the inference thread; by default it
    loads `settings.weights_path` (tests pass their own to inject slow or failing engines)."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_batch_size)
    factory = engine_factory or partial(load_engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings, factory, metrics)
        app.state.service = service
        # Loading and warm-up run in the background: ASGI servers open the port only once
        # the lifespan has started, and probes must get an answer meanwhile (/health 503
        # "starting", /health/live 200), not a refused connection.
        starting = asyncio.create_task(start(service, settings), name="start-up")
        try:
            yield
            # Under `python -m service` the drain already happened on SIGTERM, before
            # uvicorn closed the socket; this covers every other way of stopping.
            if not await service.drain(settings.shutdown_timeout_s):
                logger.error("shutdown: gave up waiting for requests still in hand")
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            app.state.service = None
            await service.stop()

    app = FastAPI(
        title="CIFAR-10 ResNet classifier",
        summary="Classifies images into the 10 CIFAR-10 classes, batching requests.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.service = None
    add_middleware(app, settings, metrics)
    install_error_handlers(app)
    app.include_router(predict_router(settings.max_files))
    app.include_router(health_router)
    app.include_router(v2_router)
    mount_page(app)
    return app
