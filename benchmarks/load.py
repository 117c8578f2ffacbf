"""Load benchmark: the service with dynamic batching against the same service without it,
or (`--compare engines`) the service on its fastest CPU engine against the torch engine,
or (`--compare proxy`) one replica behind the shipped nginx configuration (deploy/nginx,
run by the system's nginx as in deploy/proxy.py) against the same replica alone,
or (`--compare litserve`) the service against LitServe serving the same model.

    python -m benchmarks.load                       # trained weights, wrk if installed
    python -m benchmarks.load --engine torch        # batching on/off, torch engine
    python -m benchmarks.load --compare engines     # openvino vs torch, both batching
    python -m benchmarks.load --compare mirror-tta  # what averaging with the mirror costs
    python -m benchmarks.load --compare proxy       # one replica behind nginx vs bare
    python -m benchmarks.load --compare int8        # --precision int8 against auto
    python -m benchmarks.load --compare litserve --no-mirror-tta   # the peer, equal work
    python -m benchmarks.load --compare litserve --precision int8  # both on the INT8 model
    python -m benchmarks.load --no-mirror-tta       # any comparison, services without it
    python -m benchmarks.load --random-depth 56     # no trained weights yet: random ResNet56
    python -m benchmarks.load --duration 3 --concurrency 1 8 --client python   # a quick look
    python -m benchmarks.load --compare litserve --no-mirror-tta --concurrency 64 \
        --profile profiles/                         # where the CPU goes, py-spy (see below)
    python -m benchmarks.load --compare litserve --no-mirror-tta --concurrency 64 \
        --rounds 5                                  # the median of 5 alternating rounds

For each of the two configurations - batching (`--max-batch-size`, default 64, within
`--max-wait-ms`) and batching off (`max_batch_size=1`) - it starts `python -m service` on a
free port, waits for /health, then for each concurrency (1, 8, 32, 64 by default) keeps that
many connections busy posting 32x32 PNGs to /predict for `--warmup` seconds (not counted)
and `--duration` seconds (counted). The services run one after the other, never at the same
time, so neither steals the other's cores. It prints requests/s, p50 and p99 latency side
by side with the ratios, and the issue's criterion at the highest concurrency: batching
must give at least 3x the throughput with a p99 no worse (`--check` turns a miss into exit
status 1).

The load client matters on a small machine, because it shares the cores with the service:
- `wrk` (default when installed: `apt-get install wrk`): C, event-driven, a few percent of a
  core even at 64 connections. A Lua script rotates through the prepared multipart bodies
  and reports exact percentiles from wrk's latency histogram.
- `python`: a lean asyncio HTTP/1.1 client written here (keep-alive connections, prebuilt
  request bytes, no HTTP library), for machines without wrk. It costs more CPU than wrk.
Only 200 answers count as served; any other status or a broken connection is reported as
an error (there should be none: the queue limit is far above 64).

`--rounds N` repeats the comparison N times, each server started afresh, in the order A B,
B A, A B, ... (so that a machine getting steadily faster or slower favours neither), prints
every round's ratio at the highest concurrency, and reports the round whose ratio is the
median (the lower middle one for an even N) in full. On a shared machine the same server's
requests/s move by 10-20% from one minute to the next; the median keeps one lucky or
unlucky round from deciding the verdict. The verdict also fails if the first server
answered any request at the highest concurrency with an error, in any round. With
`--json`, each server's entry is a list of rounds, each a list of measurements (one per
concurrency), and `median_round` counts from 1 as the printout does. `--profile` takes
one round only.

Each measured run also records the CPU time spent per served request by the server's
processes (psutil, the process and its children: LitServe's workers too; nginx is not
counted in proxy mode) and by the load client. Where every process shares the same cores,
the throughput ratio of two servers at saturation follows the ratio of these totals, so
they say how much of a request's cost is the server's own.

`--compare litserve` (needs `pip install -e '.[bench]'`) runs `benchmarks/litserve_server.py`
as the second server: LitServe with the same engine, precision, batching limits and mirror
TTA setting, answering the same multipart /predict. Issue 17's bars at the highest
concurrency: with `--no-mirror-tta` (equal work, one forward pass per image) the service
must give 2x LitServe's throughput, with the shipped defaults 1.3x, and a p99 of at most
100 ms either way.

`--profile DIR` records each server with py-spy (`pip install -e '.[bench]'`) during the
measured run at the highest concurrency: `py-spy record --pid PID --subprocesses --threads
--rate 100 --duration DURATION --format flamegraph` into `DIR/<server>-c<clients>.svg`, one
flame graph per thread (event loop, decode thread, inference thread; LitServe's processes),
idle stacks left out, so the widths are CPU time. `--profile-native` adds C/C++ frames (the
model inside OpenVINO, PIL, the HTTP parser). py-spy needs ptrace rights on the server
(root, or `--cap-add SYS_PTRACE` in a container, or kernel.yama.ptrace_scope=0); the
profiler takes CPU from the server, so a profiled run's req/s are not the benchmark's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from deploy.proxy import running_proxy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BOUNDARY = "benchmarkboundary7MA4YWxkTrZu0gW"

WRK_SCRIPT = r"""
local bodies = {}
local counter = 0
function init(args)
  for i = 1, tonumber(args[2]) do
    local f = assert(io.open(args[1] .. "/" .. i .. ".body", "rb"))
    bodies[i] = f:read("*a")
    f:close()
  end
  counter = math.random(#bodies)
end
function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", "/predict",
    {["Content-Type"] = "multipart/form-data; boundary=BOUNDARY"}, bodies[counter])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
""".replace("BOUNDARY", BOUNDARY)


@dataclass
class Measurement:
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    served: int = 0  # requests answered 200 in the measured run
    server_cpu_us: float = float("nan")  # CPU time of the server's processes per served request
    client_cpu_us: float = float("nan")  # CPU time of the load client per served request


# --- request bodies ---------------------------------------------------------------------


def multipart_bodies(count: int, size: int) -> list[bytes]:
    """`count` distinct random PNGs of size x size, each as a /predict multipart body."""
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, "PNG")
        bodies.append(
            (
                f"--{BOUNDARY}\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + buffer.getvalue()
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
    return bodies


# --- clients ----------------------------------------------------------------------------


def run_wrk(port: int, concurrency: int, seconds: float, body_dir: Path, count: int) -> Measurement:
    script = body_dir / "predict.lua"
    script.write_text(WRK_SCRIPT)
    threads = max(1, min(concurrency, os.cpu_count() or 1, 4))
    output = subprocess.run(
        [
            *(
                "wrk",
                "-t",
                str(threads),
                "-c",
                str(concurrency),
                "-d",
                f"{max(1, round(seconds))}s",
            ),
            *("--timeout", "30s", "-s", str(script), f"http://127.0.0.1:{port}/predict"),
            *("--", str(body_dir), str(count)),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(output.split("RESULT ", 1)[1])
    served = result["requests"] - result["errors"]
    return Measurement(
        concurrency,
        served / (result["duration_us"] / 1e6),
        result["p50_us"] / 1000,
        result["p99_us"] / 1000,
        result["errors"],
        served,
    )


async def _python_load(
    port: int, concurrency: int, seconds: float, bodies: list[bytes]
) -> Measurement:
    requests = [
        (
            "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def connection(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        index = offset
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                writer.write(requests[index % len(requests)])
                index += 1
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                if head[9:12] == b"200":
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    if not latencies:
        return Measurement(concurrency, 0.0, float("nan"), float("nan"), errors)
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    served = len(latencies)
    return Measurement(concurrency, served / elapsed, float(p50), float(p99), errors, served)


# --- the service under test --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(
    port: int, weights: Path, flags: list[str], log: Path, module: str = "service"
) -> subprocess.Popen:
    """Start `python -m module` (the service, or benchmarks.litserve_server, which takes the
    same flags) in a process group of its own and wait until /health answers 200."""
    command = [
        *(sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)),
        *("--weights-path", str(weights), "--log-level", "warning", *flags),
    ]
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=True,  # its worker processes can be stopped as one group
    )
    deadline = time.monotonic() + 600  # warm-up of a big model on a slow CPU takes a while
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the service did not become ready within 10 minutes")


def stop_service(process: subprocess.Popen) -> None:
    """SIGTERM (the service drains and exits), then SIGKILL whatever is left of its process
    group: LitServe's main process dies on SIGTERM without stopping its workers."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the group id is the leader's pid
        # Give the kill a moment, so the next server does not start beside a dying one
        # (zombies keep answering signal 0 until their new parent reaps them; hence a bound).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.1)


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its live descendants (LitServe's
    workers, the service's threads are in its one process)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def client_cpu_s(client: str) -> float:
    """CPU seconds used so far by the load client: wrk is a child process this one reaps
    (so it counts in RUSAGE_CHILDREN once it exits), the Python client is this process."""
    who = resource.RUSAGE_CHILDREN if client == "wrk" else resource.RUSAGE_SELF
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def start_profiler(pid: int, seconds: float, output: Path, native: bool) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` and its children for `seconds` into a flame graph."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("--profile needs py-spy: pip install -e '.[bench]'")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        *(py_spy, "record", "--pid", str(pid), "--subprocesses", "--threads"),
        *("--rate", "100", "--duration", str(max(1, round(seconds)))),
        *("--format", "flamegraph", "--output", str(output), *(["--native"] if native else [])),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def random_weights(depth: int, folder: Path) -> Path:
    """A randomly initialised ResNet of `depth` with a valid card: same cost as trained."""
    import torch

    from model.preprocessing import CIFAR10_CLASSES
    from model.resnet import resnet
    from model.weights import Architecture, ModelCard, save_checked

    torch.manual_seed(0)
    path = folder / f"random-resnet{depth}.safetensors"
    card = ModelCard(
        name=f"resnet{depth}",
        architecture=Architecture(depth=depth, version=1, num_classes=len(CIFAR10_CLASSES)),
        classes=CIFAR10_CLASSES,
    )
    save_checked(resnet(depth, 1), path, card)
    return path


def measure_service(
    name: str,
    weights: Path,
    flags: list[str],
    args: argparse.Namespace,
    bodies: list[bytes],
    workdir: Path,
    behind_proxy: bool = False,
    module: str = "service",
) -> list[Measurement]:
    port = free_port()
    process = start_service(port, weights, flags, workdir / f"{name}.log", module)
    results = []
    try:
        with contextlib.ExitStack() as stack:
            if behind_proxy:  # the clients talk to nginx, nginx to the replica
                replica, port = f"127.0.0.1:{port}", free_port()
                stack.enter_context(running_proxy(f"127.0.0.1:{port}", [replica]))
            results = _measure(name, port, args, bodies, workdir, process.pid)
    finally:
        stop_service(process)
    return results


def _measure(
    name: str,
    port: int,
    args: argparse.Namespace,
    bodies: list[bytes],
    workdir: Path,
    server_pid: int,
) -> list[Measurement]:
    """Each concurrency in turn against the server on `port`: warm-up, then measured; with
    --profile, py-spy records the server (`server_pid`) at the highest concurrency."""
    results = []
    for concurrency in args.concurrency:
        for seconds, keep in ((args.warmup, False), (args.duration, True)):
            if seconds <= 0:
                continue
            profiler = None
            if args.profile and keep and concurrency == max(args.concurrency):
                output = args.profile / f"{name}-c{concurrency}.svg"
                profiler = start_profiler(server_pid, seconds, output, args.profile_native)
            server_cpu, client_cpu = process_tree_cpu_s(server_pid), client_cpu_s(args.client)
            if args.client == "wrk":
                result = run_wrk(port, concurrency, seconds, workdir, len(bodies))
            else:
                result = asyncio.run(_python_load(port, concurrency, seconds, bodies))
            if result.served:
                server_cpu = process_tree_cpu_s(server_pid) - server_cpu
                client_cpu = client_cpu_s(args.client) - client_cpu
                result.server_cpu_us = server_cpu / result.served * 1e6
                result.client_cpu_us = client_cpu / result.served * 1e6
            if profiler is not None:
                _, errors = profiler.communicate(timeout=seconds + 120)
                failed = errors.decode(errors="replace").strip()
                status = f"written to {output}" if profiler.returncode == 0 else failed
                print(f"  {name:<9} profile: {status}", flush=True)
            if keep:
                results.append(result)
                print(
                    f"  {name:<9} c={concurrency:<3} {result.requests_per_s:8.1f} req/s  "
                    f"p50 {result.p50_ms:8.1f} ms  p99 {result.p99_ms:8.1f} ms  "
                    f"errors {result.errors}  CPU per request: server "
                    f"{result.server_cpu_us:.0f} us, client {result.client_cpu_us:.0f} us",
                    flush=True,
                )
    return results


def throughput_ratio(a: Measurement, b: Measurement) -> float:
    """a's requests/s over b's: 0 when a served nothing, infinite when only b did not."""
    if not a.requests_per_s:
        return 0.0
    return a.requests_per_s / b.requests_per_s if b.requests_per_s else float("inf")


def median_round(first: list[list[Measurement]], second: list[list[Measurement]]) -> int:
    """The index of the round whose throughput ratio first/second at the highest
    concurrency (each round's last measurement) is the median of all rounds; for an even
    number of rounds, the lower of the two middle ones."""
    ratios = [throughput_ratio(a[-1], b[-1]) for a, b in zip(first, second, strict=True)]
    by_ratio = sorted(range(len(ratios)), key=ratios.__getitem__)
    return by_ratio[(len(ratios) - 1) // 2]


def report(
    names: tuple[str, str],
    results: tuple[list[Measurement], list[Measurement]],
    need_ratio: float | None,
    need_p99: bool,
    max_p99_ms: float | None = None,
    errors_in_other_rounds: int = 0,
) -> bool:
    """Both configurations side by side, their ratios, and the verdict at the highest
    concurrency: `names[0]` must give `need_ratio` x the throughput of `names[1]` (and, if
    `need_p99`, a p99 no worse; with `max_p99_ms`, a p99 of at most that), with no errors
    here nor, at that concurrency, in the rounds not shown (`errors_in_other_rounds`).
    With `need_ratio` None there is no verdict (always True)."""
    first, second = names
    print()
    print(
        f"{'conc.':>5} | {first + ' req/s':>17} {'p50 ms':>8} {'p99 ms':>8} | "
        f"{second + ' req/s':>17} {'p50 ms':>8} {'p99 ms':>8} | {'ratio':>7} {'p99 ratio':>9}"
    )
    for a, b in zip(*results, strict=True):
        ratio = throughput_ratio(a, b)
        print(
            f"{a.concurrency:>5} | {a.requests_per_s:>17.1f} {a.p50_ms:>8.1f} {a.p99_ms:>8.1f} | "
            f"{b.requests_per_s:>17.1f} {b.p50_ms:>8.1f} {b.p99_ms:>8.1f} | "
            f"{ratio:>6.2f}x {a.p99_ms / b.p99_ms if b.p99_ms else float('inf'):>9.2f}"
        )
    # Where a request's CPU goes on a machine whose cores every process shares: the
    # throughput ratio follows the ratio of these sums once the cores are saturated.
    print("\nCPU time per served request, us (server's processes + load client = total)")
    for a, b in zip(*results, strict=True):
        print(
            f"{a.concurrency:>5} | {first} {a.server_cpu_us:.0f} + {a.client_cpu_us:.0f} = "
            f"{a.server_cpu_us + a.client_cpu_us:.0f} | {second} {b.server_cpu_us:.0f} + "
            f"{b.client_cpu_us:.0f} = {b.server_cpu_us + b.client_cpu_us:.0f}"
        )
    a, b = results[0][-1], results[1][-1]
    ratio = throughput_ratio(a, b)
    if need_ratio is None:
        print(
            f"\nat concurrency {a.concurrency}: {first} gives {ratio:.2f}x the throughput "
            f"of {second}"
        )
        return True
    errors = a.errors + errors_in_other_rounds
    passed = ratio >= need_ratio and errors == 0 and (not need_p99 or a.p99_ms <= b.p99_ms)
    conditions = f" with p99 {a.p99_ms:.1f} ms vs {b.p99_ms:.1f} ms (need <=)" if need_p99 else ""
    if errors:
        conditions += f" and {errors} error(s) in its rounds (need none)"
    if max_p99_ms is not None:
        passed = passed and a.p99_ms <= max_p99_ms
        conditions += f" and p99 {a.p99_ms:.1f} ms (need <= {max_p99_ms:g})"
    print(
        f"\nat concurrency {a.concurrency}: {first} gives {ratio:.2f}x the throughput of "
        f"{second} (need >= {need_ratio:g}){conditions}: {'PASS' if passed else 'FAIL'}"
    )
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weights", type=Path, default=PROJECT_ROOT / "weights/resnet56.safetensors"
    )
    parser.add_argument("--random-depth", type=int, help="serve a random ResNet of this depth")
    parser.add_argument(
        "--compare",
        choices=["batching", "engines", "mirror-tta", "proxy", "int8", "litserve"],
        default="batching",
        help="batching: --engine with batching on and off (need 3x, p99 no worse); "
        "engines: the two --engines, both batching (need 2x); mirror-tta: --engine "
        "batching, with and without the mirror-image averaging (no criterion: its cost); "
        "proxy: --engine batching behind deploy/nginx against bare (need >= 0.95x: "
        "issue 14's 5%% bound on the guard's cost); "
        "int8: --engine batching with --precision int8 and with --precision (no criterion); "
        "litserve: the service against LitServe with the same engine and settings (need "
        "2x with --no-mirror-tta, 1.3x with mirror TTA, p99 <= 100 ms)",
    )
    parser.add_argument(
        "--no-mirror-tta",
        action="store_true",
        help="run the services with --no-mirror-tta (one forward pass per image)",
    )
    parser.add_argument("--engine", default="auto", help="service --engine (batching mode)")
    parser.add_argument(
        "--engines",
        nargs=2,
        default=["openvino", "torch"],
        metavar=("FASTEST", "BASELINE"),
        help="engines mode: the engine to check and its baseline",
    )
    parser.add_argument("--device", default="auto", help="service --device")
    parser.add_argument("--precision", default="auto", help="service --precision (int8, ...)")
    parser.add_argument(
        "--litserve-args",
        default="",
        help="extra flags for benchmarks.litserve_server, e.g. '--fast-queue'",
    )
    parser.add_argument(
        "--service-args",
        default="",
        help="extra flags for the service alone (litserve mode), e.g. "
        "'--inline-decode-max-pixels 0'",
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy flame graphs of each server into this folder"
    )
    parser.add_argument(
        "--profile-native", action="store_true", help="with --profile: C/C++ frames too"
    )
    parser.add_argument("--threads", type=int, default=0, help="service --threads")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternate the two servers this many times; the median round decides",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 if the criterion fails")
    args = parser.parse_args()
    if args.service_args and args.compare != "litserve":
        parser.error("--service-args goes with --compare litserve (other modes set both sides)")
    if args.compare == "int8" and args.precision == "int8":
        parser.error("--compare int8 compares int8 with --precision: pick another one")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.profile and args.rounds > 1:
        parser.error("--profile takes one round: a profiled round's req/s are not comparable")
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"

    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        workdir = Path(tmp)
        weights = random_weights(args.random_depth, workdir) if args.random_depth else args.weights
        bodies = multipart_bodies(64, args.image_size)
        for i, body in enumerate(bodies, start=1):
            (workdir / f"{i}.body").write_bytes(body)
        batching = [
            *("--max-batch-size", str(args.max_batch_size)),
            *("--max-wait-ms", str(args.max_wait_ms)),
        ]
        common = ["--device", args.device, "--threads", str(args.threads)]
        common += ["--precision", args.precision]
        if args.no_mirror_tta:
            common.append("--no-mirror-tta")
        max_p99_ms: float | None = None
        if args.compare == "batching":  # issue 3: the same engine, batching on and off
            configs = {
                "batched": [*common, "--engine", args.engine, *batching],
                "unbatched": [*common, "--engine", args.engine, "--max-batch-size", "1"],
            }
            need_ratio, need_p99 = 3.0, True
        elif args.compare == "mirror-tta":  # the price of the default's second pass
            configs = {
                "no-mirror": [*common, "--engine", args.engine, *batching, "--no-mirror-tta"],
                "mirror": [*common, "--engine", args.engine, *batching],
            }
            need_ratio, need_p99 = None, False
        elif args.compare == "proxy":  # issue 14: the connection guard may cost at most 5%
            configs = {
                "proxy": [*common, "--engine", args.engine, *batching],
                "bare": [*common, "--engine", args.engine, *batching],
            }
            need_ratio, need_p99 = 0.95, False
        elif args.compare == "int8":  # issue 17: what the INT8 model gains end to end
            same = [*common, "--engine", args.engine, *batching]
            configs = {"int8": [*same, "--precision", "int8"], args.precision: same}
            need_ratio, need_p99 = None, False
        elif args.compare == "litserve":  # issue 17: the peer framework, same model and work
            same = [*common, "--engine", args.engine, *batching]
            configs = {
                "service": [*same, *shlex.split(args.service_args)],
                "litserve": [*same, *shlex.split(args.litserve_args)],
            }
            need_ratio, need_p99 = (2.0 if args.no_mirror_tta else 1.3), False
            max_p99_ms = 100.0
        else:  # issue 6: the fastest engine against torch, both batching
            fastest, baseline = args.engines
            configs = {
                fastest: [*common, "--engine", fastest, *batching],
                baseline: [*common, "--engine", baseline, *batching],
            }
            need_ratio, need_p99 = 2.0, False
        print(f"weights {weights}, client {args.client}, {os.cpu_count()} CPUs", flush=True)
        modules = {"litserve": "benchmarks.litserve_server"}
        rounds_by_server: dict[str, list[list[Measurement]]] = {name: [] for name in configs}
        for index in range(args.rounds):
            if args.rounds > 1:
                print(f"round {index + 1} of {args.rounds}", flush=True)
            order = list(configs.items())
            if index % 2:  # A B, B A, ...: a steady drift of the machine favours neither
                order.reverse()
            for name, flags in order:
                rounds_by_server[name].append(
                    measure_service(
                        name,
                        weights,
                        flags,
                        args,
                        bodies,
                        workdir,
                        behind_proxy=name == "proxy",
                        module=modules.get(name, "service"),
                    )
                )
    names = tuple(configs)
    first_rounds, second_rounds = rounds_by_server[names[0]], rounds_by_server[names[1]]
    chosen = median_round(first_rounds, second_rounds)
    if args.rounds > 1:
        ratios = ", ".join(
            f"{throughput_ratio(a[-1], b[-1]):.2f}x"
            for a, b in zip(first_rounds, second_rounds, strict=True)
        )
        lower = " (the lower middle one)" if args.rounds % 2 == 0 else ""
        print(
            f"\nratio at concurrency {first_rounds[0][-1].concurrency}, round by round: "
            f"{ratios}; the median{lower} is round {chosen + 1}'s, reported below"
        )
    passed = report(
        (names[0], names[1]),
        (first_rounds[chosen], second_rounds[chosen]),
        need_ratio,
        need_p99,
        max_p99_ms,
        errors_in_other_rounds=sum(
            run[-1].errors for i, run in enumerate(first_rounds) if i != chosen
        ),
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    **{
                        name: [[asdict(m) for m in run] for run in server_rounds]
                        for name, server_rounds in rounds_by_server.items()
                    },
                    "median_round": chosen + 1,
                    "passed": passed,
                },
                indent=2,
            )
        )
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
