"""The LitServe baseline of `benchmarks.load --compare litserve` answers what the service
answers, refuses what is not an image, and is stopped whole by the benchmark's harness
(LitServe runs its API server and inference worker as processes of their own).

Needs the `bench` extra (`pip install -e '.[bench]'`); skipped without litserve."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.load import free_port, start_service, stop_service
from tests.support.images import noise_image, png
from tests.support.reference import reference_probabilities

pytest.importorskip("litserve", reason="the LitServe baseline needs pip install -e '.[bench]'")


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (zombies count as gone)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(entry.name))
    return members


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process groups from /proc")
@pytest.mark.parametrize("mirror_tta", [True, False])
def test_litserve_baseline_serves_the_same_model(
    weights_file: Path, tmp_path: Path, mirror_tta: bool
) -> None:
    port = free_port()
    flags = [
        *("--engine", "torch", "--device", "cpu", "--max-batch-size", "4"),
        "--mirror-tta" if mirror_tta else "--no-mirror-tta",
    ]
    process: subprocess.Popen | None = None
    try:
        process = start_service(
            port, weights_file, flags, tmp_path / "litserve.log", "benchmarks.litserve_server"
        )
        assert len(_group_members(process.pid)) >= 2  # its own workers, in its group
        url = f"http://127.0.0.1:{port}/predict"
        answer = httpx.post(url, files={"file": ("a.png", png(3), "image/png")}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        (expected,) = reference_probabilities(weights_file, [noise_image(40, 36, 3)], mirror_tta)
        assert list(body["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)

        garbage = httpx.post(url, files={"file": ("a.png", b"not an image")}, timeout=30)
        assert garbage.status_code == 400 and "not a decodable image" in garbage.text
    finally:
        if process is not None:
            stop_service(process)
            deadline = time.monotonic() + 10
            while _group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _group_members(process.pid) == []
