"""Health probes: HEAD on every GET route (issue 14, kind 6), and health while the model
loads, in process and with `python -m service` (kind 7)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from model.engines.base import Engine
from service.app import create_app, load_engine
from service.config import Settings
from tests.service.conftest import Spawn
from tests.support.images import png
from tests.support.server import free_port, wait_process_ready
from tests.support.service import metric, running, settings_for, wait_ready


def _get_routes(client: TestClient) -> list[str]:
    """Every GET path the app documents, its path parameters filled in with the served
    model's name and version (a new parameter fails here, to be added), and the
    documentation pages themselves."""
    health = client.get("/health").json()
    known = {"model_name": health["model_name"], "model_version": health["model_version"]}
    spec = client.get("/openapi.json").json()
    paths = [path.format(**known) for path, ops in spec["paths"].items() if "get" in ops]
    paths += ["/openapi.json", "/docs", "/redoc"]
    assert {"/health", "/health/live", "/metrics"} <= set(paths)
    return paths


def test_every_get_route_answers_head_with_the_get_status_and_headers_and_no_body(
    client: TestClient,
) -> None:
    for path in _get_routes(client):
        got = client.get(path)
        head = client.head(path)
        assert head.status_code == got.status_code, path
        assert got.status_code == 200, path
        assert head.content == b"", path
        assert head.headers.get("content-type") == got.headers.get("content-type"), path
        if path not in ("/metrics",):  # the metrics text changes between the two calls
            assert head.headers["content-length"] == got.headers["content-length"], path


def test_head_keeps_the_status_of_a_get_that_finds_nothing(client: TestClient) -> None:
    for path in ("/v2/models/no-such-model", "/v2/models/no-such-model/ready"):
        assert (client.get(path).status_code, client.head(path).status_code) == (404, 404), path
        assert client.head(path).content == b"", path


def test_head_on_the_health_endpoints(client: TestClient) -> None:
    for path in ("/health", "/health/live"):
        response = client.head(path, headers={"X-Request-ID": "probe-1"})
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["x-request-id"] == "probe-1"


def test_head_is_counted_as_head_and_other_methods_are_unchanged(client: TestClient) -> None:
    before = client.get("/metrics").text
    client.head("/health/live")
    after = client.get("/metrics").text
    labels = {"route": "/health/live", "method": "HEAD", "status": "200"}
    assert (
        metric(after, "http_requests_total", **labels)
        - metric(before, "http_requests_total", **labels)
        == 1
    )
    # HEAD where GET is not allowed, or nothing is routed, keeps its error status.
    assert client.head("/predict").status_code == 405
    assert client.head("/predict").headers["allow"] == "POST"
    assert client.head("/no-such-page").status_code == 404


# --- kind 7: health while the model loads ----------------------------------------------


def _gated_factory(
    settings: Settings, gate: threading.Event, fail: bool = False
) -> Callable[[], Engine]:
    def factory() -> Engine:
        assert gate.wait(timeout=60), "the test never opened the gate"
        if fail:
            raise RuntimeError("simulated failure while loading the weights")
        return load_engine(settings)

    return factory


def test_while_the_model_loads_health_says_starting_and_live_says_alive(
    weights_file: Path,
) -> None:
    settings = settings_for(weights_file, max_batch_size=2)
    gate = threading.Event()

    async def scenario() -> None:
        app = create_app(settings, _gated_factory(settings, gate))
        async with running(app, ready=False) as client:
            for _ in range(3):  # asked again and again, the answer stays the truth
                health = await client.get("/health")
                assert health.status_code == 503
                assert health.json()["status"] == "starting"
                assert health.json()["engine"] is None
                live = await client.get("/health/live")
                assert (live.status_code, live.json()) == (200, {"status": "alive"})
                assert (await client.head("/health")).status_code == 503
                assert (await client.head("/health/live")).status_code == 200
                await asyncio.sleep(0.05)
            refused = await client.post("/predict", files={"file": ("a.png", png(1))})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "not_ready"
            assert refused.headers["retry-after"] == "1"
            assert (await client.get("/metrics")).status_code == 200

            gate.set()
            await wait_ready(client)
            health = (await client.get("/health")).json()
            assert (health["status"], health["engine"]) == ("ready", "torch")
            answered = await client.post("/predict", files={"file": ("a.png", png(1))})
            assert answered.status_code == 200

    try:
        asyncio.run(scenario())
    finally:
        gate.set()


def test_when_loading_fails_health_and_live_say_failed(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=2)
    gate = threading.Event()
    gate.set()

    async def scenario() -> None:
        app = create_app(settings, _gated_factory(settings, gate, fail=True))
        async with running(app, ready=False) as client:
            while (health := await client.get("/health")).json()["status"] == "starting":
                await asyncio.sleep(0.01)
            assert (health.status_code, health.json()["status"]) == (503, "failed")
            live = await client.get("/health/live")
            assert (live.status_code, live.json()) == (503, {"status": "failed"})
            refused = await client.post("/predict", files={"file": ("a.png", png(1))})
            assert (refused.status_code, refused.json()["error"]["code"]) == (503, "not_ready")

    asyncio.run(scenario())


def test_a_drain_during_loading_is_not_undone_when_loading_ends(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=2)
    gate = threading.Event()

    async def scenario() -> None:
        app = create_app(settings, _gated_factory(settings, gate))
        async with running(app, ready=False) as client:
            assert await app.state.service.drain(timeout_s=5)
            gate.set()
            while not app.state.service.loaded:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            health = await client.get("/health")
            assert (health.status_code, health.json()["status"]) == (503, "draining")

    try:
        asyncio.run(scenario())
    finally:
        gate.set()


# `python -m service` with its engine factory held until a file appears (or failing then).
_GATED_MAIN = textwrap.dedent(
    """
    import pathlib, sys, time
    import service.__main__ as main

    real = main.create_engine

    def gated(*args, **kwargs):
        gate = pathlib.Path(sys.argv[1])
        while not gate.exists():
            time.sleep(0.05)
        if gate.read_text() == "fail":
            raise RuntimeError("simulated failure while loading the weights")
        return real(*args, **kwargs)

    main.create_engine = gated
    sys.exit(main.main(sys.argv[2:]))
    """
)


@dataclass
class GatedStart:
    """`python -m service` whose port is open while its model load waits for `gate`: write
    "go" to the file to let it load, "fail" to make loading raise. `first` is the first
    answer on the port (GET /health)."""

    url: str
    gate: Path
    process: subprocess.Popen[str]
    first: httpx.Response


@pytest.fixture
def gated_start(weights_file: Path, tmp_path: Path, spawn: Spawn) -> Iterator[GatedStart]:
    """Start the gated service and wait for its first answer. On the way out the gate is
    opened if the test did not, so the process is not left waiting; the spawn fixture then
    ends it, whatever happened."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gate = tmp_path / "gate"
    command = [sys.executable, "-c", _GATED_MAIN, str(gate), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--weights-path", str(weights_file), "--engine", "torch"]
    command += ["--max-batch-size", "2"]
    process = spawn(command)
    try:
        yield GatedStart(url, gate, process, _first_answer(url, process))
    finally:
        if not gate.exists():
            gate.write_text("go")


def _first_answer(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            return httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail("the port never opened")


def test_the_port_opens_before_the_model_loads(gated_start: GatedStart) -> None:
    url, process = gated_start.url, gated_start.process
    first = gated_start.first  # the model is held back: still loading
    assert (first.status_code, first.json()["status"]) == (503, "starting")
    live = httpx.get(f"{url}/health/live", timeout=2)
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    assert httpx.head(f"{url}/health", timeout=2).status_code == 503
    assert httpx.head(f"{url}/health/live", timeout=2).status_code == 200

    gated_start.gate.write_text("go")
    wait_process_ready(url, process)
    assert httpx.post(f"{url}/predict", files={"file": ("a", png(1))}).status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_a_failed_load_after_the_port_opened_exits_3(gated_start: GatedStart) -> None:
    process = gated_start.process
    assert gated_start.first.json()["status"] == "starting"
    gated_start.gate.write_text("fail")
    assert process.wait(timeout=60) == 3
    stderr = process.communicate()[1]
    assert "simulated failure while loading the weights" in stderr
