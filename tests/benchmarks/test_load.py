"""The load benchmark's CPU accounting counts what a server's processes spend, children
included (LitServe's inference worker is a child process of its API server), and with
`--rounds` the verdict comes from the round whose ratio is the median."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import load
from benchmarks.load import Measurement, median_round, process_tree_cpu_s

# A child that burns 0.55 s of CPU (measured as CPU time, whatever else runs), then waits.
# The test asks for 0.5 s: /proc counts CPU time in clock ticks (10 ms each, user and
# system rounded down apart), so a child that stops at exactly 0.5 s can read as 0.49.
_BUSY_CHILD = (
    "import time\n"
    "while time.process_time() < 0.55: pass\n"
    "print('done', flush=True)\n"
    "time.sleep(60)\n"
)


def test_the_cpu_of_a_server_includes_its_child_processes() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {_BUSY_CHILD!r}])",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so the test can stop the grandchild with its parent
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "done"  # the grandchild has burnt its CPU
        # The parent itself only waits; the half second is the child's.
        assert process_tree_cpu_s(parent.pid) >= 0.5
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def _round(*requests_per_s: float) -> list[Measurement]:
    """One round of one server: a measurement per concurrency, the highest last."""
    return [
        Measurement(concurrency, rate, 10.0, 20.0, 0, int(rate))
        for concurrency, rate in zip((8, 64), requests_per_s, strict=True)
    ]


def test_the_median_round_is_chosen_by_the_ratio_at_the_highest_concurrency() -> None:
    # Ratios at 64 clients: 1.5x, 2.1x, 1.8x. At 8 clients round 0 would look best.
    service = [_round(900, 1500), _round(100, 2100), _round(100, 1800)]
    peer = [_round(100, 1000), _round(100, 1000), _round(100, 1000)]
    assert median_round(service, peer) == 2


def test_an_even_number_of_rounds_takes_the_lower_middle_ratio() -> None:
    service = [_round(1, 1900), _round(1, 1500), _round(1, 2100), _round(1, 1800)]
    peer = [_round(1, 1000)] * 4
    assert median_round(service, peer) == 3  # 1.8x, not 1.9x
    assert median_round(service[:1], peer[:1]) == 0  # one round: that round


def _run_rounds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, service: list[float], errors: list[int]
) -> tuple[int, list[str], dict]:
    """`--compare litserve --rounds N --check` with each server's measurement faked: the
    service at `service[i]` req/s (with `errors[i]` errors) in round i, LitServe at 1,000.
    Returns the exit status, the order the servers ran in, and the JSON written."""
    ran: list[str] = []

    def measure(name: str, *args: object, **kwargs: object) -> list[Measurement]:
        ran.append(name)
        round_index = ran.count(name) - 1
        rate = service[round_index] if name == "service" else 1000.0
        failed = errors[round_index] if name == "service" else 0
        return [Measurement(64, rate, 10.0, 20.0, failed, int(rate))]

    monkeypatch.setattr(load, "measure_service", measure)
    output = tmp_path / "load.json"
    argv = ["load", "--compare", "litserve", "--no-mirror-tta", "--concurrency", "64"]
    argv += ["--rounds", str(len(service)), "--check", "--json", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    status = load.main()
    return status, ran, json.loads(output.read_text())


def test_rounds_alternate_the_order_and_the_median_round_decides(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Ratios 2.5x, 1.5x, 2.1x: the median, 2.1x (round 3), meets the 2x bar; round 2 alone
    # would fail it.
    status, ran, saved = _run_rounds(monkeypatch, tmp_path, [2500, 1500, 2100], [0, 0, 0])
    assert status == 0
    assert ran == ["service", "litserve", "litserve", "service", "service", "litserve"]
    assert saved["median_round"] == 3
    assert [run[0]["requests_per_s"] for run in saved["service"]] == [2500, 1500, 2100]
    assert saved["passed"] is True


def test_errors_in_a_round_not_reported_still_fail_the_verdict(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    status, _, saved = _run_rounds(monkeypatch, tmp_path, [2500, 1500, 2100], [3, 0, 0])
    assert status == 1
    assert saved["median_round"] == 3  # an error-free round, at 2.1x
    assert saved["passed"] is False
