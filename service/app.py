"""The FastAPI application: `create_app(settings)` wires settings, lifespan, routes, errors.

Start-up and shutdown live in the lifespan: it loads the model (on the inference thread),
warms it up, and only then lets requests in; on the way out it waits until every admitted
request is answered before the batcher and its threads stop.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from model.weights import load_checked
from service.config import Settings
from service.engines import Engine, EngineOptions, create_engine
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.routes import health_router, predict_router
from service.runtime import Service
from service.v2 import router as v2_router

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
        try:
            await service.start()
            # Move everything start-up created (torch, the engine, ~1e6 objects) out of the
            # garbage collector's view: full collections then stay short under load
            # (the technique of Instagram's gc.freeze, Python 3.7+).
            gc.collect()
            gc.freeze()
            app.state.service = service
            logger.info(
                "ready: %s %s on %s, batches of up to %d within %.1f ms",
                service.model_name,
                service.model_version,
                service.batcher.engine.describe(),
                settings.max_batch_size,
                settings.max_wait_ms,
            )
            yield
            # Under `python -m service` the drain already happened on SIGTERM, before
            # uvicorn closed the socket; this covers every other way of stopping.
            if not await service.drain(settings.shutdown_timeout_s):
                logger.error("shutdown: gave up waiting for requests still in hand")
        finally:
            app.state.service = None
            await service.stop()

    app = FastAPI(
        title="CIFAR-10 ResNet classifier",
        summary="Classifies images into the 10 CIFAR-10 classes, batching requests.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.service = None
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    install_error_handlers(app)
    app.include_router(predict_router(settings.max_files))
    app.include_router(health_router)
    app.include_router(v2_router)
    return app
