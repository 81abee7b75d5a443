"""A small file replaced only if nobody replaced it since it was read: compare-and-swap on local disk and S3.

The search index's manifests and its refresh journal are each the commit point
of a writer that read them first. Two writers that read the same version must
not both commit: the second would name files the first has already retired, or
undo the first's partitions. So every such write names the version it read
(`expected`, None for "no file yet") and fails with `ConcurrentWrite` when the
stored version is another.

- S3: the version is the object's ETag; the write is one PUT with `If-Match`
  (or `If-None-Match: *` for a first write), which S3 evaluates atomically and
  answers 412 (or 409 for a concurrent conditional write) on a mismatch. pyarrow's
  S3 filesystem has no conditional writes, so these go through boto3, configured
  from the same storage options as delta-rs and pyarrow.
- Locally: the version is the sha256 of the bytes; writers serialise on an
  `flock` of a lock file beside the target (the kernel frees it when a writer
  dies), compare, then write a scratch file and rename it over the target, so a
  reader without the lock sees the old file or the whole new one.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import ClientError

from imgemb_assets.core.storage.arrow_filesystem import ArrowLocation

# The S3 error codes of a lost conditional write: 412 for a mismatched ETag or an object
# that now exists, 409 when another conditional write to the key is in flight.
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


class ConcurrentWrite(Exception):
    """The file was replaced (or created, or deleted) by another writer since it was read."""


@dataclass(frozen=True)
class Versioned:
    body: bytes | None  # None: no such file
    version: str | None  # None exactly when body is None


def read_versioned(location: ArrowLocation, name: str) -> Versioned:
    """The file's bytes and the version a `write_if_unchanged` of it must name."""
    if location.is_local:
        try:
            with open(location.file(name), "rb") as stream:
                body = stream.read()
        except FileNotFoundError:
            return Versioned(None, None)
        return Versioned(body, _digest(body))
    bucket, key = _bucket_and_key(location, name)
    try:
        answer = location_client(location).get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
            return Versioned(None, None)
        raise
    return Versioned(answer["Body"].read(), answer["ETag"])


def write_if_unchanged(location: ArrowLocation, name: str, body: bytes, expected: str | None) -> str:
    """Replace the file with `body` if its version is still `expected` (None: if it does not exist); the new version.

    Raises ConcurrentWrite, leaving the file as the other writer left it, otherwise.
    """
    if location.is_local:
        return _write_local(location, name, body, expected)
    bucket, key = _bucket_and_key(location, name)
    condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
    try:
        answer = location_client(location).put_object(Bucket=bucket, Key=key, Body=body, **condition)
    except ClientError as error:
        if str(error.response.get("Error", {}).get("Code")) in _CONFLICT_CODES:
            raise ConcurrentWrite(f"{location.file(name)} was written by another writer since it was read") from error
        raise
    return str(answer["ETag"])


def _write_local(location: ArrowLocation, name: str, body: bytes, expected: str | None) -> str:
    target = location.file(name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _locked(f"{os.path.dirname(target)}/.{os.path.basename(target)}.lock"):
        current = read_versioned(location, name).version
        if current != expected:
            raise ConcurrentWrite(f"{target} was written by another writer since it was read")
        scratch = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{uuid.uuid4().hex}"
        try:
            with open(scratch, "wb") as stream:
                stream.write(body)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(scratch, target)
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
    return _digest(body)


@contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _bucket_and_key(location: ArrowLocation, name: str) -> tuple[str, str]:
    bucket, _, key = location.file(name).partition("/")
    return bucket, key


def location_client(location: ArrowLocation) -> Any:
    """A boto3 S3 client reaching `location` with the storage options its pyarrow filesystem was built from."""
    return s3_client(location.storage_options)


def s3_client(options: Mapping[str, str] | None) -> Any:
    """boto3's S3 client configured like delta-rs and `arrow_filesystem.s3_filesystem` (same options).

    One client per distinct set of options (credentials included, so rotated ones get a new one):
    a refresh reads and writes a manifest per model, and building a boto3 client each time costs more
    than the request.
    """
    return _client_for(tuple(sorted((options or {}).items())))


@functools.lru_cache(maxsize=8)
def _client_for(option_items: tuple[tuple[str, str], ...]) -> Any:
    import boto3

    options = dict(option_items)
    endpoint = options.get("AWS_ENDPOINT_URL") or None
    if endpoint and not urlparse(endpoint).scheme:
        endpoint = f"{'http' if options.get('AWS_ALLOW_HTTP', '').lower() == 'true' else 'https'}://{endpoint}"
    arguments: dict[str, Any] = {
        "aws_access_key_id": options.get("AWS_ACCESS_KEY_ID"),
        "aws_secret_access_key": options.get("AWS_SECRET_ACCESS_KEY"),
        "aws_session_token": options.get("AWS_SESSION_TOKEN"),
        "region_name": options.get("AWS_REGION"),
        "endpoint_url": endpoint,
    }
    return boto3.session.Session().client("s3", **{key: value for key, value in arguments.items() if value})
