"""The shipped proxy configuration (deploy/nginx/classifier.conf), run by the system's nginx
in front of `python -m service` replicas on loopback: the Compose deployment without
containers. A replica stopped under load costs no request; slow and silent clients are cut
off within the bounds docs/deployment.md states; the upload limit is the service's."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from deploy.proxy import CLASSIFIER_CONF, running_proxy
from model.preprocessing import CIFAR10_CLASSES
from service.config import Settings
from tests.support.images import png
from tests.support.server import free_port
from tests.support.tools import PROJECT_ROOT, require_tool

# The bounds classifier.conf sets and docs/deployment.md states, in seconds.
HEAD_TIMEOUT_S = 10  # client_header_timeout: the whole request head
BODY_PAUSE_S = 10  # client_body_timeout: a pause in the body
IDLE_TIMEOUT_S = 10  # keepalive_timeout: an idle kept-alive connection
# How late a close may come after its bound, on a loaded 2-core machine.
SLACK_S = 5


@pytest.fixture(scope="module", autouse=True)
def _nginx() -> None:
    require_tool("nginx", fix="apt-get install nginx (.ci/run installs it)")


def _address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


@dataclass
class Replica:
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answered(self) -> dict[str, list[int]]:
        """Request id -> statuses this replica answered, from its JSON access log lines."""
        statuses: dict[str, list[int]] = {}
        for line in self.log.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("logger") == "service.access" and entry.get("path") == "/predict":
                statuses.setdefault(entry["request_id"], []).append(entry["status"])
        return statuses


@contextmanager
def replicas(weights: Path, folder: Path, count: int) -> Iterator[list[Replica]]:
    """`count` `python -m service` processes on loopback (torch engine: nothing exported into
    the user's cache), all ready; killed on the way out whatever happened."""
    started: list[Replica] = []
    try:
        for index in range(count):
            port = free_port()
            log = folder / f"replica{index}.log"
            command = [
                *(sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)),
                *("--weights-path", str(weights), "--engine", "torch", "--threads", "1"),
                *("--max-batch-size", "4"),
            ]
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT
                )
            started.append(Replica(port, log, process))
        deadline = time.monotonic() + 180
        for replica in started:
            while True:
                assert replica.process.poll() is None, replica.log.read_text()
                try:
                    url = f"http://{replica.address}/health"
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, replica.log.read_text()
                time.sleep(0.2)
        yield started
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.kill()
            replica.process.wait()


@pytest.fixture(scope="module")
def one_replica_proxy(
    weights_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Replica]]:
    """The proxy's address, in front of one ready replica."""
    listen = f"127.0.0.1:{free_port()}"
    with ExitStack() as stack:
        folder = tmp_path_factory.mktemp("one-replica")
        [replica] = stack.enter_context(replicas(weights_file, folder, 1))
        stack.enter_context(running_proxy(listen, [replica.address]))
        yield listen, replica


# --- a replica stopped under load ---------------------------------------------------------


@dataclass
class Load:
    """Clients posting PNGs through the proxy, each waiting for its answer before the next,
    every request with its own X-Request-ID (the service logs it)."""

    url: str
    clients: int = 4
    most_requests: int = 1000  # bounded whatever happens
    answers: dict[str, httpx.Response | Exception] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self.stop.is_set():
                with self.lock:
                    if len(self.answers) >= self.most_requests:
                        return
                    request_id = uuid.uuid4().hex
                    self.answers[request_id] = RuntimeError("no answer yet")
                image = png(seed % 50)
                seed += self.clients
                try:
                    answer: httpx.Response | Exception = http.post(
                        "/predict",
                        files={"file": ("image.png", image, "image/png")},
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.HTTPError as error:
                    answer = error
                with self.lock:
                    self.answers[request_id] = answer

    def count(self) -> int:
        with self.lock:
            return sum(isinstance(a, httpx.Response) for a in self.answers.values())

    def wait_for(self, more: int, timeout: float = 120) -> None:
        target = self.count() + more
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"the load stalled at {self.count()} answers"
            assert len(self.answers) < self.most_requests, "the request bound was reached"
            time.sleep(0.05)


def test_sigterm_to_one_replica_under_load_fails_and_loses_no_request(
    weights_file: Path, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    with ExitStack() as stack:
        cluster = stack.enter_context(replicas(weights_file, tmp_path, 3))
        stack.enter_context(running_proxy(listen, [r.address for r in cluster]))
        load = Load(f"http://{listen}")
        pool = stack.enter_context(ThreadPoolExecutor(load.clients))
        stack.callback(load.stop.set)  # runs before the pool's shutdown waits
        clients = [pool.submit(load.client, seed) for seed in range(load.clients)]

        load.wait_for(40)  # under way
        stopped = cluster[0]
        stopped.process.send_signal(signal.SIGTERM)
        sent_at_sigterm = len(load.answers)
        assert stopped.process.wait(timeout=60) == 0, stopped.log.read_text()
        load.wait_for(40)  # and it goes on without it, whose port is now closed
        load.stop.set()
        for client in clients:
            client.result(timeout=60)

    failures = {
        request_id: answer if isinstance(answer, Exception) else answer.text
        for request_id, answer in load.answers.items()
        if isinstance(answer, Exception) or answer.status_code != 200
    }
    assert not failures, failures
    # Every answer is a response by now (no failures above).
    labels = {
        answer.json()["label"]
        for answer in load.answers.values()
        if isinstance(answer, httpx.Response)
    }
    assert labels <= set(CIFAR10_CLASSES)
    assert len(load.answers) > sent_at_sigterm + 40

    # Every request was answered 200 by exactly one replica (none lost, none served twice),
    # the stopped one among them until it drained.
    served: dict[str, int] = {}
    for replica in cluster:
        for request_id, statuses in replica.answered().items():
            served[request_id] = served.get(request_id, 0) + statuses.count(200)
    assert {rid: n for rid, n in served.items() if n != 1} == {}
    assert set(served) == set(load.answers)
    assert stopped.answered(), "the stopped replica never served"
    assert "signal received: draining" in stopped.log.read_text()


# --- slow and silent clients ------------------------------------------------------------


def _closed_after(sock: socket.socket, started: float, trickle: bytes = b"") -> float:
    """Seconds from `started` until the peer closes `sock` (EOF or reset); meanwhile sends
    one byte of `trickle` every half second, if given."""
    sock.settimeout(0.5)
    sent = 0
    while time.monotonic() - started < 60:
        try:
            if sock.recv(65536) == b"":
                break
        except TimeoutError:
            if sent < len(trickle):
                try:
                    sock.send(trickle[sent : sent + 1])
                    sent += 1
                except OSError:
                    break
        except OSError:  # reset: nginx resets timed-out connections (reset_timedout_connection)
            break
    return time.monotonic() - started


def _silent(address: tuple[str, int]) -> float:
    started = time.monotonic()
    with socket.create_connection(address) as sock:
        return _closed_after(sock, started)


def _slow_head(address: tuple[str, int]) -> float:
    """A head that never ends: one more header byte every half second (slowloris)."""
    started = time.monotonic()
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        return _closed_after(sock, started, trickle=b"a" * 200)


def _idle_after_answer(address: tuple[str, int]) -> float:
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        return _closed_after(sock, time.monotonic())


def _stalled_body(address: tuple[str, int]) -> float:
    started = time.monotonic()
    with socket.create_connection(address) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nX-Request-ID: stalled-body\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n"
        )
        return _closed_after(sock, started)


def test_slow_and_silent_connections_are_closed_within_the_bounds(
    one_replica_proxy: tuple[str, Replica],
) -> None:
    listen, replica = one_replica_proxy
    address = _address(listen)
    cases = {
        "silent": (_silent, HEAD_TIMEOUT_S),
        "slow head": (_slow_head, HEAD_TIMEOUT_S),
        "idle after an answer": (_idle_after_answer, IDLE_TIMEOUT_S),
        "stalled body": (_stalled_body, BODY_PAUSE_S),
    }
    with ThreadPoolExecutor(len(cases)) as pool:  # side by side: one bound's wait in all
        futures = {name: pool.submit(case, address) for name, (case, _) in cases.items()}
        closed = {name: future.result(timeout=90) for name, future in futures.items()}
    for name, (_, bound) in cases.items():
        # Not before the bound (the timeout closed it, nothing else), and not long after.
        assert bound - 0.5 <= closed[name] <= bound + SLACK_S, (name, closed)
    # nginx holds an unfinished body itself: the replica never saw the stalled upload.
    assert "stalled-body" not in replica.answered()
    assert "stalled-body" not in replica.log.read_text()


def test_upload_limit_is_the_services(one_replica_proxy: tuple[str, Replica]) -> None:
    listen, _ = one_replica_proxy
    conf = CLASSIFIER_CONF.read_text()
    [size] = re.findall(r"^\s*client_max_body_size (\d+)m;", conf, re.MULTILINE)
    limit = int(size) * 1024 * 1024
    assert limit == Settings().max_upload_bytes
    with socket.create_connection(_address(listen)) as sock:
        # Refused on the announced length, before a byte of the body is sent.
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: " + str(limit + 1).encode() + b"\r\n\r\n"
        )
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert json.loads(body)["error"]["code"] == "upload_too_large"
    # A body of exactly the limit passes the proxy and reaches a replica (which then judges
    # the image itself: padding after the file makes it a valid multipart body).
    image = png(1)
    prefix = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b\r\n"
        b'Content-Disposition: form-data; name="padding"\r\n\r\n'
    )
    suffix = b"\r\n--b--\r\n"
    body = prefix + b"x" * (limit - len(prefix) - len(suffix)) + suffix
    assert len(body) == limit
    response = httpx.post(
        f"http://{listen}/predict",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
        timeout=60,
    )
    assert response.status_code != 413, response.text
    assert "x-request-id" in response.headers  # the replica's answer, not the proxy's
