"""Start moto's S3 server as a subprocess on 127.0.0.1 (used by the tests and the S3 benchmark).

In-process moto makes delta-rs hang (DeltaTable.history / is_deltatable), so the
server runs as its own process, as a real endpoint would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key-0123456789"}


def client_environment(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point every client (boto3, delta-rs) at the moto server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        # no shared config or credentials files from the machine running the tests
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        **MOTO_CREDENTIALS,
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Poll `url` until the server subprocess answers it; fail if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise TimeoutError(f"{process.args[0]} did not answer on {url} within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM a server subprocess, SIGKILL it if it is still there after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def running_moto_server() -> Iterator[str]:
    """The URL of a moto S3 server subprocess, stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto_server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_listening(f"{url}/moto-api/", process)
        yield url
    finally:
        stop(process)


def set_iam_auth(endpoint: str, enabled: bool) -> None:
    """Make the moto server check every request's credentials and IAM permissions, as AWS does (S3 then
    answers 403 to unknown keys and to identities without permission), or stop checking them."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0" if enabled else b"inf",  # requests let through before checking starts
        method="POST",
        headers={"Content-Type": "text/plain"},  # else the body is read as a form and the server fails
    )
    urllib.request.urlopen(request, timeout=10).close()
