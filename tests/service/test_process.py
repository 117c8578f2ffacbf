"""`python -m service` as a real process: refusing bad weights, and draining on SIGTERM.

Every process a test starts goes through the `spawn` fixture (conftest.py), which kills and
reaps the ones still running when the test ends, whether it passed or failed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from model.weights import card_path, sha256_of
from tests.service.conftest import Spawn
from tests.support.images import png
from tests.support.server import free_port, wait_process_ready
from tests.support.service import metric


def _service(spawn: Spawn, weights: Path, port: int, *flags: str) -> subprocess.Popen[str]:
    return spawn(
        [
            *(sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)),
            # torch: no engine export into the user's cache from a test
            *("--weights-path", str(weights), "--engine", "torch", *flags),
        ]
    )


def _listening(port: int) -> bool:
    """Whether something accepts connections on the local port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_refused(
    processes: dict[str, tuple[subprocess.Popen[str], int]], timeout: float = 120
) -> dict[str, str]:
    """Wait until every process has exited and return each one's stderr. A process that
    opens its port instead (it started serving what it should have refused) fails the test
    at once, not after the timeout; the timeout only bounds a hang (importing torch in
    several processes at once on a busy machine can take a while)."""
    stderr: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(stderr) < len(processes):
        for reason, (process, port) in processes.items():
            if reason in stderr:
                continue
            if process.poll() is not None:
                stderr[reason] = process.communicate()[1]
            elif _listening(port):
                pytest.fail(f"{reason}: the service started serving instead of refusing")
        assert time.monotonic() < deadline, f"still running: {set(processes) - set(stderr)}"
        time.sleep(0.1)
    return stderr


def _copy_weights(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    shutil.copy(card_path(source), card_path(target))
    return target


def _edit_card(weights: Path, **changes: object) -> None:
    card = json.loads(card_path(weights).read_text())
    for key, value in changes.items():
        if key == "depth":
            card["architecture"]["depth"] = value
        else:
            card[key] = value
    card_path(weights).write_text(json.dumps(card))


def test_bad_weights_exit_nonzero_with_a_one_line_reason(
    weights_file: Path, tmp_path: Path, spawn: Spawn
) -> None:
    missing = tmp_path / "missing" / "resnet56.safetensors"

    corrupt = _copy_weights(weights_file, tmp_path / "corrupt" / "w.safetensors")
    data = bytearray(corrupt.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte: the SHA-256 no longer matches the card
    corrupt.write_bytes(bytes(data))

    mismatched = _copy_weights(weights_file, tmp_path / "mismatched" / "w.safetensors")
    _edit_card(mismatched, sha256="0" * 64)

    not_safetensors = tmp_path / "garbage" / "w.safetensors"
    _copy_weights(weights_file, not_safetensors)
    not_safetensors.write_bytes(b"this is not a safetensors file")
    _edit_card(not_safetensors, sha256=sha256_of(not_safetensors))

    wrong_architecture = _copy_weights(weights_file, tmp_path / "arch" / "w.safetensors")
    _edit_card(wrong_architecture, depth=20)  # a ResNet8's tensors do not fit a ResNet20

    no_card = _copy_weights(weights_file, tmp_path / "nocard" / "w.safetensors")
    card_path(no_card).unlink()

    cases: dict[str, tuple[Path, tuple[str, ...]]] = {
        "not found": (missing, ()),
        "SHA-256": (corrupt, ()),
        "card says": (mismatched, ()),
        "not a readable safetensors": (not_safetensors, ()),
        "does not fit ResNet20": (wrong_architecture, ()),
        "model card": (no_card, ()),
        "setting engine": (weights_file, ("--engine", "tensorrt")),
        # _service passes --engine torch
        "torch engine cannot run int8": (weights_file, ("--precision", "int8")),
    }
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        cases["calibration images"] = (
            weights_file,
            ("--engine", "openvino", "--precision", "int8", "--calibration-path", "/nonexistent"),
        )
    if not torch.accelerator.is_available():
        cases["no accelerator"] = (weights_file, ("--device", "cuda"))
    # All at once: each process pays for importing torch, so in parallel they take one's time.
    ports = {reason: free_port() for reason in cases}
    processes = {
        reason: (_service(spawn, path, ports[reason], *flags), ports[reason])
        for reason, (path, flags) in cases.items()
    }
    stderr = _wait_refused(processes)
    for reason, (process, _) in processes.items():
        assert process.returncode == 2, (reason, stderr[reason])
        errors = [line for line in stderr[reason].splitlines() if line.startswith("error:")]
        assert len(errors) == 1, stderr[reason]
        assert reason in errors[0], errors[0]
        assert "Traceback" not in stderr[reason]


def test_sigterm_answers_every_accepted_request_then_exits_0(
    weights_file: Path, spawn: Spawn
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _service(spawn, weights_file, port, "--max-batch-size", "16")
    go = threading.Event()

    def slow_upload(seed: int) -> httpx.Response:
        """A request that is accepted, then still uploading when SIGTERM arrives."""
        request = httpx.Request("POST", url, files={"file": ("a.png", png(seed))})
        body = request.read()

        def chunks() -> Iterator[bytes]:
            yield body[: len(body) // 2]
            go.wait(timeout=60)
            yield body[len(body) // 2 :]

        headers = {"content-type": request.headers["content-type"]}
        return httpx.post(f"{url}/predict", content=chunks(), headers=headers, timeout=60)

    try:
        wait_process_ready(url, process)
        with ThreadPoolExecutor(6) as pool:
            in_flight = [pool.submit(slow_upload, seed) for seed in range(6)]
            deadline = time.monotonic() + 30
            while metric(httpx.get(f"{url}/metrics").text, "inference_pending_images") < 6:
                assert time.monotonic() < deadline, "the requests were never admitted"
                time.sleep(0.02)

            process.send_signal(signal.SIGTERM)
            health = httpx.get(f"{url}/health", timeout=5)
            while health.json()["status"] == "ready":  # the signal is handled asynchronously
                health = httpx.get(f"{url}/health", timeout=5)
            assert (health.status_code, health.json()["status"]) == (503, "draining")
            refused = httpx.post(f"{url}/predict", files={"file": ("b", png(9))}, timeout=10)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"

            go.set()  # the accepted requests finish their uploads, during the drain
            answers = [future.result() for future in in_flight]
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        assert process.wait(timeout=60) == 0
    finally:
        go.set()  # the uploads end, whatever happened; the spawn fixture ends the process
    stderr = process.communicate()[1]
    assert "draining, 6 images in hand" in stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health/live", timeout=2)  # and the port is closed
