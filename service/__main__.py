"""`python -m service`: check the weights, then serve with uvicorn until SIGTERM.

Exit status: 0 after a SIGTERM/SIGINT shutdown in which every accepted request was answered;
2 when a setting is invalid or the weights, engine or device cannot be used (one line on
stderr says why); 3 when loading or warming up the model fails after the port has opened
(the log has the traceback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from functools import partial
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from model.engines import EngineUnavailableError, check_engine, create_engine
from model.weights import WeightsError, load_checked
from service.app import create_app, engine_options
from service.config import Settings

logger = logging.getLogger("service")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy to grep, and what log shippers expect."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


class DrainingServer(uvicorn.Server):
    """uvicorn, but a first SIGTERM/SIGINT drains the app before the socket closes.

    uvicorn alone closes the listening socket at once, then re-raises the signal after its
    shutdown, so the process dies with -15. Here the first signal turns readiness to 503 and
    refuses new predictions (503 shutting_down) while everything already admitted is
    answered; then uvicorn's own graceful shutdown runs and the process exits 0. A second
    signal falls through to uvicorn's handling (a second Ctrl-C stops at once).
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task[None] | None = None
        self.start_failed = False

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's main loop asks this every 0.1 s whether to stop. The model loads in
        the background while the port is open; if loading fails, the process stops (exit
        status 3) rather than answer 503 for ever."""
        service = self._app.state.service
        if service is not None and service.state == "failed":
            self.start_failed = True
            return True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        if not self.started or self._app.state.service is None:
            self.should_exit = True  # nothing accepted yet: nothing to drain
            return
        loop = asyncio.get_running_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        service = self._app.state.service
        logger.info("signal received: draining, %d images in hand", service.pending)
        if not await service.drain(self._drain_timeout_s):
            logger.error("drain timed out after %.0f s", self._drain_timeout_s)
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as error:  # a bad flag or SERVICE_* variable: say which, briefly
        for problem in error.errors():
            # A combination of settings (engine x device) has no one field to name.
            where = ".".join(str(part) for part in problem["loc"]) or "engine and device"
            print(f"error: setting {where}: {problem['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        # Checked here, before uvicorn starts, so that a device this machine lacks or a bad
        # file gives one clear line and exit 2 rather than a failed start (exit 3).
        check_engine(settings.engine, engine_options(settings))
        model, card = load_checked(settings.weights_path)
    except (WeightsError, EngineUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    factory = partial(create_engine, settings.engine, model, card, engine_options(settings))
    app = create_app(settings, factory)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,  # keep the JSON logging configured above
        access_log=False,  # the app logs one structured line per request itself
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    server = DrainingServer(config, app, settings.shutdown_timeout_s)
    server.run()
    return 3 if server.start_failed else 0


if __name__ == "__main__":
    sys.exit(main())
