"""A moto S3 server subprocess that starts with many objects already in a bucket (the notification benchmark).

Uploading 100,000 objects over HTTP to moto takes 8 to 15 minutes on a 2-core
machine (100 to 240 PUTs a second). This server process creates them before it
starts serving, through moto's own backend (`S3Backend.put_object`, what a PUT
ends in): they are real objects of the bucket, listed, read, copied and deleted
over HTTP like any other, made in seconds. The server is moto's own (`moto.server.main`)
in the same process, so it serves the backend the objects were put in.

    python -m imgemb_support.moto_preloaded --port 5000 --bucket b --key-format 'raw/img_{:07d}.jpg' --count 100000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imgemb_support.moto_server import free_port, stop, wait_until_listening

REGION = "us-east-1"


def preload(bucket: str, key_format: str, count: int, body: bytes = b"x") -> None:
    """Create `bucket` and `count` objects named `key_format.format(number)` in this process's moto backend."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(bucket, REGION)
    for number in range(count):
        key = backend.put_object(bucket, key_format.format(number), body, disable_notification=True)
        # A PUT over HTTP computes the ETag for its answer and keeps it; without that, moto's
        # DeleteObject closes the key's buffer before its notification reads the ETag (a 500).
        key.etag  # noqa: B018 (read for its side effect)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--key-format", required=True, help="a str.format pattern taking the object's number")
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    preload(args.bucket, args.key_format, args.count)
    from moto.server import main as moto_server_main

    moto_server_main(["-H", args.host, "-p", str(args.port)])


@contextmanager
def running_preloaded_moto_server(bucket: str, key_format: str, count: int, timeout_s: float = 600.0) -> Iterator[str]:
    """The URL of a moto server subprocess whose `bucket` holds `count` objects from the start; stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgemb_support.moto_preloaded",
            "--port",
            str(port),
            "--bucket",
            bucket,
            "--key-format",
            key_format,
            "--count",
            str(count),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],  # imgemb_support is imported from the repository root
    )
    try:
        wait_until_listening(f"{url}/moto-api/", process, timeout_s=timeout_s)
        yield url
    finally:
        stop(process)


if __name__ == "__main__":
    main()
