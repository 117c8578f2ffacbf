"""The shipped proxy configuration (deploy/nginx/classifier.conf) run by a local nginx, in
front of replicas on loopback: the Compose deployment without containers.

    python -m service --port 8001 & python -m service --port 8002 &
    python -m deploy.proxy --listen 127.0.0.1:8000 --replica 127.0.0.1:8001 --replica 127.0.0.1:8002

The tests (tests/deploy/test_proxy.py) and `benchmarks/load.py --compare proxy` use
`running_proxy`. Only the two lines of classifier.conf marked "address" are replaced (the
listening address and the replicas'); every timeout, limit and retry rule is the shipped
one. Needs nginx on PATH (Debian: `apt-get install nginx`; .ci/run installs it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

CLASSIFIER_CONF = Path(__file__).resolve().parent / "nginx" / "classifier.conf"

# The replicas' line (one name standing for every replica) and the listening line.
_SERVER_LINE = re.compile(r"^(\s*)server classifier:8000((?: [^;]*)?);", re.MULTILINE)
_LISTEN_LINE = re.compile(r"^(\s*)listen 8000;.*$", re.MULTILINE)


class ProxyError(RuntimeError):
    """nginx is missing, refused the configuration, or did not start listening."""


def _replace_once(
    pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str], text: str
) -> str:
    result, count = pattern.subn(replace, text)
    if count != 1:
        raise ProxyError(
            f"{CLASSIFIER_CONF} must have exactly one line matching {pattern.pattern!r} "
            f"(found {count}); keep the lines marked 'address' as they are"
        )
    return result


def render_classifier_conf(listen: str, replicas: Sequence[str]) -> str:
    """classifier.conf with `listen` ("127.0.0.1:8080") and one `server` line per replica
    ("127.0.0.1:8001"), each with the shipped server parameters (max_fails, fail_timeout)."""
    if not replicas:
        raise ProxyError("at least one replica address is needed")
    text = CLASSIFIER_CONF.read_text()
    match = _SERVER_LINE.search(text)
    indent, parameters = (match.group(1), match.group(2)) if match else ("", "")
    servers = "\n".join(f"{indent}server {address}{parameters};" for address in replicas)
    text = _replace_once(_SERVER_LINE, lambda _: servers, text)
    return _replace_once(_LISTEN_LINE, lambda line: f"{line.group(1)}listen {listen};", text)


def write_config(folder: Path, listen: str, replicas: Sequence[str]) -> Path:
    """nginx.conf for a foreground nginx whose files all live in `folder`, including the
    rendered classifier.conf the way the official image includes conf.d/*.conf."""
    (folder / "classifier.conf").write_text(render_classifier_conf(listen, replicas))
    temp_paths = "\n".join(
        f"    {kind}_temp_path {folder / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would otherwise switch to an unprivileged user that cannot
    # enter this (private) folder to buffer large uploads.
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = folder / "nginx.conf"
    config.write_text(
        f"{user}daemon off;\n"
        "worker_processes auto;\n"  # as in the official image's nginx.conf
        f"pid {folder / 'nginx.pid'};\n"
        "error_log stderr warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {folder / 'access.log'};\n"  # on, as in the official image
        f"{temp_paths}\n"
        f"    include {folder / 'classifier.conf'};\n"
        "}\n"
    )
    return config


def _nginx() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).exists()),
        None,
    )
    if not found:
        raise ProxyError("nginx not found: apt-get install nginx (or your system's package)")
    return found


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def start_proxy(folder: Path, listen: str, replicas: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start nginx in the foreground; returns once it accepts connections on `listen`."""
    nginx = _nginx()
    config = write_config(folder, listen, replicas)
    checked = subprocess.run(
        [nginx, "-t", "-q", "-e", "stderr", "-p", str(folder), "-c", str(config)],
        capture_output=True,
        text=True,
    )
    if checked.returncode != 0:
        raise ProxyError(f"nginx refused the configuration:\n{checked.stderr}")
    log = (folder / "nginx.log").open("wb")
    process = subprocess.Popen(
        [nginx, "-e", "stderr", "-p", str(folder), "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ProxyError(f"nginx exited: {(folder / 'nginx.log').read_text()}")
        try:
            socket.create_connection(_split(listen), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    stop_proxy(process)
    raise ProxyError(f"nginx did not listen on {listen} within 10 s")


def stop_proxy(process: subprocess.Popen[bytes]) -> None:
    """SIGQUIT (nginx's graceful stop), then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_proxy(listen: str, replicas: Sequence[str]) -> Iterator[Path]:
    """nginx with the shipped configuration for the duration of the block; yields its
    folder (nginx.log holds its error log)."""
    with tempfile.TemporaryDirectory(prefix="proxy-") as tmp:
        folder = Path(tmp)
        process = start_proxy(folder, listen, replicas)
        try:
            yield folder
        finally:
            stop_proxy(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8000", help="address:port to serve")
    parser.add_argument(
        "--replica", action="append", required=True, help="a replica's address:port (repeat)"
    )
    args = parser.parse_args(argv)
    try:
        with running_proxy(args.listen, args.replica) as folder:
            print(f"proxy on http://{args.listen} -> {', '.join(args.replica)} ({folder})")
            # Blocked only now, after nginx started: a child inherits the signal mask.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except ProxyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
