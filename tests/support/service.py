"""Helpers for the service tests: small settings, engines that block or fail, an in-process
app driven by httpx, and reading one sample out of /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from model.engines.base import Engine
from service.app import load_engine
from service.config import Settings


def settings_for(weights: Path, **overrides: Any) -> Settings:
    """Small, fast settings for in-process apps (few batch sizes to warm up).

    The torch engine in fp32, so answers can be compared with the plain model's exactly;
    the other engines' parity is tested in test_engines.py."""
    values: dict[str, Any] = {
        "weights_path": weights,
        "engine": "torch",
        "max_batch_size": 8,
        "max_wait_ms": 20,
    }
    values.update(overrides)
    return Settings(**values)


class GatedEngine(Engine):
    """Wraps a real engine; `run` waits for `gate` (set by default) and records batch sizes.
    With `fail` set it raises instead, like an engine that hit a device error."""

    def __init__(self, inner: Engine) -> None:
        # Engine keeps no model of its own; the wrapped engine holds the real one.
        super().__init__(torch.nn.Identity(), inner.card, inner.options)
        self.name = inner.name
        self.precision = inner.precision
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()  # set when a batch has entered run()
        self.fail = False
        self.batches: list[int] = []  # the size of each run() (two per batch with mirror_tta)
        self.warmed: list[int] = []

    @property
    def device(self) -> str:
        return self.inner.device

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        self.warmed = list(batch_sizes)
        self.inner.warm_up(self.warmed)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        self.started.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        if self.fail:
            raise RuntimeError("simulated device failure")
        self.batches.append(images.shape[0])
        return self.inner.run(images)


def gated_factory(settings: Settings) -> tuple[Callable[[], Engine], Callable[[], GatedEngine]]:
    """A factory for create_app and a getter for the engine it built."""
    built: list[GatedEngine] = []

    def factory() -> Engine:
        built.append(GatedEngine(load_engine(settings)))
        return built[0]

    return factory, lambda: built[0]


@contextlib.asynccontextmanager
async def running(app: FastAPI, *, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and talk to it in-process, concurrently if need be. The
    model loads in the background; with `ready` (the default) this waits until /health
    says so, as a load balancer would."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if ready:
                await wait_ready(client)
            yield client


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while (response := await client.get("/health")).status_code != 200:
        assert response.json()["status"] == "starting", response.text
        assert time.monotonic() < deadline, "the app never became ready"
        await asyncio.sleep(0.01)


def wait_ready_sync(client: TestClient, timeout_s: float = 120) -> None:
    """wait_ready for a TestClient (which runs the app on a thread of its own)."""
    deadline = time.monotonic() + timeout_s
    while (response := client.get("/health")).status_code != 200:
        assert response.json()["status"] == "starting", response.text
        assert time.monotonic() < deadline, "the app never became ready"
        time.sleep(0.01)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and found == wanted:
            return float(value)
    return 0.0
