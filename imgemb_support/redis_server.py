"""A real Redis server for the tests (the Celery broker and result backend): Debian's `redis-server`,
on 127.0.0.1 and a free port, without persistence, stopped at the end.

As with PostgreSQL, only a developer machine (not root, no apt-get, no CI) skips when the server is
missing; CI installs it (or this module does, as root with apt-get), so CI cannot pass without it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imgemb_support.debian_packages import installed_or_fail
from imgemb_support.moto_server import free_port, stop


def redis_server_or_fail() -> str:
    """The path of `redis-server`, installed from Debian's package when missing and running as root."""
    return installed_or_fail("redis-server", lambda: shutil.which("redis-server"), "PATH")


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def running_redis_server(timeout_s: float = 30.0) -> Iterator[str]:
    """`redis://127.0.0.1:PORT` of a fresh server; stopped and its directory removed on exit."""
    binary = redis_server_or_fail()
    root = Path(tempfile.mkdtemp(prefix="imgemb-redis-"))
    port = free_port()
    log = root / "server.log"
    # No RDB snapshots, no AOF: a broker for one test session need not outlive it.
    args = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(root),
        "--logfile",
        str(log),
        "--daemonize",
        "no",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers_ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log.exists() else ""
                pytest.fail(f"redis-server did not answer on 127.0.0.1:{port} (exit {process.poll()}):\n{tail}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(process)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The base URL of the session's Redis server; callers pick a database number (`/0`, `/1`)."""
    with running_redis_server() as url:
        yield url
