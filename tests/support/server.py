"""Real sockets: a free local port, the app under uvicorn in a thread of the test process for
clients that need a socket (tritonclient, schemathesis), stopped every time, and waiting for
a `python -m service` process to become ready."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS's pick; free when asked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app: FastAPI, start_timeout_s: float = 120.0, *, ready: bool = True) -> Iterator[str]:
    """Serve `app` (lifespan included) and yield its "127.0.0.1:PORT"; the server stops
    and its thread is joined on the way out, whatever the test did. The port opens before
    the model has loaded; with `ready` (the default) this waits until GET /health says 200,
    as a load balancer would. RuntimeError if it does not start or load within
    `start_timeout_s` seconds, or loading fails."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on port {port} did not start")
            time.sleep(0.05)
        while ready and (health := httpx.get(f"http://127.0.0.1:{port}/health")).is_error:
            if health.json()["status"] != "starting" or time.monotonic() > deadline:
                raise RuntimeError(f"the test server never became ready: {health.text}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def wait_process_ready(
    url: str,
    process: subprocess.Popen[Any],
    timeout: float = 120,
    output: Callable[[], str] | None = None,
) -> None:
    """Wait until GET `url`/health answers 200. A process that exits first fails the test with
    its output; one still not ready after `timeout` seconds is killed (so that its output can
    be read) and fails it. The timeout bounds a hang only (a busy machine imports torch
    slowly). The output is `output()` when given (e.g. a log file's text), else the process's
    stderr, which must then have been started with stderr=PIPE and text=True."""

    def said() -> str:
        return output() if output is not None else process.communicate()[1]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the service exited: {said()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"the service never became ready: {said()}")
