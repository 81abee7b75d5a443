"""Listing and reading the objects under a root: a local folder or an `s3://` prefix.

Assets only see the `ObjectStore` protocol and `open_object_store`, so a scheme
slots in here without touching them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from botocore.exceptions import ClientError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

from imgemb_assets.core.s3 import S3Settings, split_s3_uri

# Read local files in chunks when fingerprinting, so a large file never sits in memory twice.
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a root. `key` is its '/'-separated path relative to the root."""

    uri: str
    key: str
    size_bytes: int
    etag: str
    last_modified: datetime


class ObjectStore(Protocol):
    root_uri: str

    def list_prefixes(self) -> list[str]:
        """The partition keys: first path segments under the root that hold objects, sorted."""
        ...

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix/` (every object for ""), in key order."""
        ...

    def list_root_files(self) -> list[str]:
        """Objects directly under the root: they belong to no partition."""
        ...

    def read_bytes(self, uri: str) -> bytes: ...


class StorageError(Exception):
    """An object or root cannot be used; the message says which and why."""


class ObjectMissing(StorageError):
    """A listed object is gone (deleted since the listing)."""


class ObjectRefused(StorageError):
    """A listed object that is never read (a symbolic link); the message is the reason."""


def partition_key_of(key: str) -> str | None:
    """The partition a key belongs to: its first path segment, or None directly under the root."""
    head, sep, _ = key.partition("/")
    return head if sep and head else None


def local_path_of(uri: str) -> Path | None:
    """The filesystem path of a local URI (plain path or file://), or None for remote schemes."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _md5_of_file(path: Path) -> str:
    # md5 of the content is what S3 reports as the ETag of a single-part upload,
    # so a local root and a bucket fingerprint the same file the same way.
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LocalObjectStore:
    """Objects are the regular files below a folder, and its symbolic links.

    Links are listed (so they are accounted for) but never followed: reading one
    raises ObjectRefused, since it could lead outside the root.
    """

    root: Path

    def __post_init__(self) -> None:
        # Resolve once so containment checks and relative keys compare like with like.
        object.__setattr__(self, "root", self.root.resolve())

    @property
    def root_uri(self) -> str:
        return str(self.root)

    def list_prefixes(self) -> list[str]:
        if not self.root.is_dir():
            raise StorageError(f"raw-images root {self.root} is not a folder")
        return sorted(
            entry.name
            for entry in os.scandir(self.root)
            if entry.is_dir(follow_symlinks=False) and any(self._walk_files(Path(entry.path)))
        )

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        folder = self._inside_root(self.root / prefix)
        if not folder.is_dir():
            return
        for path in sorted(self._walk_files(folder)):
            stat = path.lstat()
            yield ObjectInfo(
                uri=str(path),
                key=path.relative_to(self.root).as_posix(),
                size_bytes=stat.st_size,
                # a link's fingerprint is its target's name: the link is what is listed
                etag=hashlib.md5(os.readlink(path).encode()).hexdigest() if path.is_symlink() else _md5_of_file(path),
                last_modified=datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc),
            )

    def list_root_files(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if e.is_file(follow_symlinks=False))

    def read_bytes(self, uri: str) -> bytes:
        path = local_path_of(uri)
        if path is None:
            raise StorageError(f"{uri!r} is not a local path")
        if path.is_symlink():
            raise ObjectRefused("symbolic link: not followed (it could lead outside the raw-images root)")
        try:
            return self._inside_root(path).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{uri} no longer exists") from exc

    def _walk_files(self, folder: Path) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            # os.walk puts links to folders among the folders (not descended into)
            for name in [*filenames, *(d for d in dirnames if (Path(dirpath) / d).is_symlink())]:
                path = Path(dirpath) / name
                if path.is_symlink() or path.is_file():
                    yield path

    def _inside_root(self, path: Path) -> Path:
        # A key such as '../x' must never make a run read outside its root.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise StorageError(f"{path} is outside the root {self.root}")
        return resolved


@dataclass(frozen=True)
class S3ObjectStore:
    """Objects under `s3://bucket/root_key/`, listed with paginated ListObjectsV2."""

    client: Any = field(repr=False)
    bucket: str
    root_key: str  # no leading or trailing slash; "" for the whole bucket
    # botocore retries a request until its headers arrive, not a body cut off
    # afterwards: such reads are retried here, this many times in all.
    body_read_attempts: int = 5

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.root_key}".rstrip("/")

    def list_prefixes(self) -> list[str]:
        return sorted(
            common["Prefix"][len(self._key_prefix("")) :].rstrip("/")
            for page in self._pages(self._key_prefix(""), delimiter="/")
            for common in page.get("CommonPrefixes", [])
        )

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        start = self._key_prefix(prefix)
        for page in self._pages(start):
            for entry in page.get("Contents", []):
                key = entry["Key"]
                if key.endswith("/"):
                    continue  # a "folder" marker made by consoles, not an object with content
                yield ObjectInfo(
                    uri=f"s3://{self.bucket}/{key}",
                    key=key[len(self._key_prefix("")) :],
                    size_bytes=int(entry["Size"]),
                    etag=entry["ETag"].strip('"'),
                    last_modified=entry["LastModified"].astimezone(timezone.utc),
                )

    def list_root_files(self) -> list[str]:
        root = self._key_prefix("")
        return sorted(
            entry["Key"][len(root) :]
            for page in self._pages(root, delimiter="/")
            for entry in page.get("Contents", [])
            if not entry["Key"].endswith("/")
        )

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3_uri(uri)
        if bucket != self.bucket or not key.startswith(self._key_prefix("")):
            raise StorageError(f"{uri} is outside the root {self.root_uri}")
        for attempt in range(1, self.body_read_attempts + 1):
            try:
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise ObjectMissing(f"{uri} no longer exists") from exc
                raise
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError):
                if attempt == self.body_read_attempts:
                    raise
        raise AssertionError("unreachable")

    def _key_prefix(self, prefix: str) -> str:
        parts = [part for part in (self.root_key, prefix) if part]
        return "".join(f"{part}/" for part in parts)

    def _pages(self, key_prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        arguments = {"Bucket": self.bucket, "Prefix": key_prefix}
        if delimiter:
            arguments["Delimiter"] = delimiter
        # The paginator follows continuation tokens: a prefix may hold far more than 1,000 objects.
        yield from self.client.get_paginator("list_objects_v2").paginate(**arguments)


def open_object_store(root_uri: str, s3: S3Settings | None = None) -> ObjectStore:
    """The store for a root URI; the scheme picks the implementation."""
    path = local_path_of(root_uri)
    if path is not None:
        return LocalObjectStore(path)
    scheme = urlparse(root_uri).scheme
    if scheme == "s3":
        bucket, root_key = split_s3_uri(root_uri)
        settings = s3 or S3Settings()
        return S3ObjectStore(
            client=settings.client(), bucket=bucket, root_key=root_key, body_read_attempts=settings.max_attempts
        )
    raise StorageError(f"unsupported storage scheme {scheme!r} in {root_uri!r}; use a local path or s3://")
