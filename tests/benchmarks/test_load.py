"""The load benchmark's CPU accounting counts what a server's processes spend, children
included (LitServe's inference worker is a child process of its API server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from benchmarks.load import process_tree_cpu_s

# A child that burns 0.5 s of CPU (measured as CPU time, whatever else runs), then waits.
_BUSY_CHILD = (
    "import time\n"
    "while time.process_time() < 0.5: pass\n"
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
