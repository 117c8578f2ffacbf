"""The demo page in a real browser: Playwright (pytest-playwright) driving Debian's chromium,
against `python -m service` started with the shipped ResNet56 weights.

The browser is the system's (`CHROMIUM`, else `chromium` on the PATH; `apt-get install
chromium`), never one Playwright downloads. Without it these tests are skipped, unless
`CHROMIUM` names it (as .ci/run does): then its absence fails them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.support.server import free_port, wait_process_ready
from tests.support.tools import PROJECT_ROOT

# The shipped model: the page must show what a person would see ("cat" for the cat).
WEIGHTS = PROJECT_ROOT / "weights" / "resnet56.safetensors"


def _chromium() -> str:
    configured = os.environ.get("CHROMIUM")
    if configured:
        if not Path(configured).is_file():
            pytest.fail(f"CHROMIUM={configured} does not exist; apt-get install -y chromium")
        return configured
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium on the PATH: apt-get install -y chromium (.ci/run does)")
    return found


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """pytest-playwright's launch arguments, with the system's chromium."""
    return {**browser_type_launch_args, "executable_path": _chromium()}


@pytest.fixture(scope="session", autouse=True)
def _patient_expectations() -> None:
    # A 2-core CI box that also trains may take more than Playwright's default 5 s.
    expect.set_options(timeout=20_000)


class _BlankPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>a front end</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output quiet


@pytest.fixture(scope="session")
def front_end() -> Iterator[int]:
    """The port of a blank page on another origin than the service's, for CORS. A real
    server on the loopback address: Chromium refuses pages it cannot place on the network
    (such as ones faked by Playwright's routing) access to the loopback address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BlankPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="session")
def front_end_origin(front_end: int) -> str:
    """The front end's origin that the service's --cors-origins allows. The same page
    reached as http://127.0.0.1:PORT is another origin, which it does not allow."""
    return f"http://localhost:{front_end}"


@pytest.fixture(scope="session")
def service_url(tmp_path_factory: pytest.TempPathFactory, front_end_origin: str) -> Iterator[str]:
    """`python -m service` on a free port until the session ends; killed whatever happens."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("service") / "service.log"
    command = [
        *(sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)),
        *("--weights-path", str(WEIGHTS), "--engine", "torch", "--threads", "1"),
        *("--max-batch-size", "4", "--log-level", "warning"),
        *("--cors-origins", front_end_origin),
    ]
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_process_ready(url, process, output=log.read_text)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def base_url(service_url: str) -> str:
    """pytest-playwright's base URL: `page.goto("/")` opens the service's page."""
    return service_url
