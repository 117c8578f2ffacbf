from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.support.service import settings_for, wait_ready_sync
from tests.support.tools import PROJECT_ROOT


@pytest.fixture(scope="module")
def client(weights_file: Path) -> Iterator[TestClient]:
    """One started app per test module (warm-up is the slow part), with small limits so
    the limit tests need no big uploads."""
    settings = settings_for(
        weights_file, max_upload_bytes=500_000, max_pixels=1_000_000, max_files=4
    )
    with TestClient(create_app(settings)) as test_client:
        wait_ready_sync(test_client)
        yield test_client


Spawn = Callable[[list[str]], subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a command in the project root (stdout and stderr captured, as text); every
    process still running when the test ends is killed, and all are reaped."""
    started: list[subprocess.Popen[str]] = []

    def start(command: list[str]) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
