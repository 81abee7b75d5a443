"""Listing and reading the objects under a root: a local folder or an `s3://` prefix.

Assets only see the `ObjectStore` protocol and `open_object_store`, so a scheme
slots in here without touching them.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from botocore.exceptions import ClientError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

from imgemb_assets.core.storage.s3 import S3Settings, split_s3_uri

# Read local files in chunks when fingerprinting, so a large file never sits in memory twice.
_HASH_CHUNK_BYTES = 1 << 20
# S3 answers to a GET that concern that one object, not the caller's identity or
# settings (an expired token or a skewed clock fails every object and stays a failure).
_OBJECT_REFUSED_CODES = {
    "InvalidObjectState": "archived (S3 Glacier / Deep Archive / archive tier): restore it, then materialize the partition again",
    "AccessDenied": "access denied: grant read access to it, then materialize the partition again",
}
# A non-UTF-8 local name is shown (in keys and URIs) with its undecodable bytes as \xNN.
_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")
_NOT_UTF8 = "name is not valid UTF-8 (its bytes are shown as \\xNN): rename it in UTF-8"


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a root. `key` is its '/'-separated path relative to the root."""

    uri: str
    key: str
    size_bytes: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class PrefixListing:
    """The first path segments under a root: those that are partitions, and those that cannot be, with why."""

    prefixes: list[str]  # sorted
    refused: dict[str, str] = field(default_factory=dict)  # name as shown -> reason


@dataclass(frozen=True)
class FolderListing:
    """One folder's direct content: its objects, its sub-folders that hold objects, and the sub-folders refused."""

    objects: list[ObjectInfo]  # directly in the folder, in key order
    folders: list[str]  # sorted, each as a path relative to the root
    refused: dict[str, str] = field(default_factory=dict)  # path as shown -> reason


@dataclass(frozen=True)
class FolderPage:
    """A slice of one folder's delimited listing, in key order, and where the next slice starts."""

    listing: FolderListing
    # Pass as `start_after` to continue; None once the folder has been listed to its end.
    resume_after: str | None


class ObjectStore(Protocol):
    @property
    def root_uri(self) -> str: ...

    def list_folder_pages(self, folder: str, start_after: str | None, max_pages: int) -> FolderPage:
        """At most `max_pages` listing requests of `list_folder`, starting after `start_after` (a key or folder
        path relative to the root, as a previous page's `resume_after` gave it)."""
        ...

    def list_folder(self, folder: str) -> FolderListing:
        """The objects directly in `folder` ("" for the root) and its sub-folders, in one delimited listing."""
        ...

    def list_prefixes(self) -> list[str]:
        """The partition keys: first path segments under the root that hold objects and can be partitions, sorted."""
        ...

    def list_partition_folders(self) -> PrefixListing:
        """The partition keys, and the first path segments refused as partitions with the reason."""
        ...

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix/` (every object for ""), in key order."""
        ...

    def list_root_files(self) -> list[str]:
        """Objects directly under the root: they belong to no partition."""
        ...

    def read_bytes(self, uri: str) -> bytes: ...

    def refusal(self, uri: str) -> str | None:
        """Why a listed object is never read, when that is known without reading it (else None)."""
        ...


class StorageError(Exception):
    """An object or root cannot be used; the message says which and why."""


class ObjectMissing(StorageError):
    """A listed object is gone (deleted since the listing)."""


class ObjectRefused(StorageError):
    """A listed object that is not read (a link, an archived or denied object, ...); the message is the reason."""


def partition_key_problem(name: str) -> str | None:
    """Why a first path segment cannot be a partition key, or None when it can.

    Such a segment is reported by name with this reason (its objects belong to
    no partition) instead of being registered: a key that Dagster, its UI or an
    HTTP client would change or refuse would otherwise fail every run for it, or
    every registration of the prefixes found with it.
    """
    if not name:
        return "empty first path segment ('<root>//...'): it would stand for the whole root, so it is no partition"
    if any(unicodedata.category(char) == "Cs" for char in name):
        return _NOT_UTF8
    if name in (".", ".."):
        return f"{name!r} is a path step: file systems and HTTP clients collapse it, so it names no folder of its own"
    # Dagster's own rule for partition keys (INVALID_PARTITION_SUBSTRINGS): "..." is
    # its range syntax, and control characters (it names seven) do not display in its UI.
    if "..." in name:
        return "contains '...', which Dagster reads as a partition range"
    control = next((char for char in name if unicodedata.category(char) == "Cc"), None)
    if control is not None:
        return f"contains the control character U+{ord(control):04X}, which Dagster and its UI cannot show"
    return None


def shown_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (surrogate-escaped by the OS layer) shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


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


def _kind(path: Path) -> str | None:
    """'file', 'link', 'folder', 'other' (a FIFO, a device: never read), 'unknown' (cannot be looked at), None (gone)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError:
        return "unknown"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISREG(mode):
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "other"


def _etag(path: Path, status: os.stat_result | None) -> str:
    if status is not None and stat.S_ISLNK(status.st_mode):
        # a link's fingerprint is its target's name: the link is what is listed
        return hashlib.md5(os.fsencode(os.readlink(path))).hexdigest()
    if status is not None and stat.S_ISREG(status.st_mode):
        try:
            return _md5_of_file(path)
        except PermissionError:
            pass
    # What cannot be read: its mode is in, so fixing permissions changes the
    # listing's fingerprint and the partition is materialized again.
    facts = "unknown" if status is None else f"{status.st_mode}\0{status.st_size}\0{status.st_mtime_ns}"
    return hashlib.md5(f"unread\0{facts}".encode()).hexdigest()


@dataclass(frozen=True)
class LocalObjectStore:
    """Objects are the regular files below a folder, its symbolic links, and its folders that cannot be listed.

    Links are listed (so they are accounted for) but never followed: reading one
    raises ObjectRefused, since it could lead outside the root. A first-level link
    to a folder is refused as a partition. A folder that cannot be listed, a file
    that cannot be read and a name that is not UTF-8 are listed too, and refused
    with the reason when read, so no object vanishes from a manifest unaccounted for.
    """

    root: Path

    def __post_init__(self) -> None:
        # Resolve once so containment checks and relative keys compare like with like.
        object.__setattr__(self, "root", self.root.resolve())

    @property
    def root_uri(self) -> str:
        return str(self.root)

    def list_prefixes(self) -> list[str]:
        return self.list_partition_folders().prefixes

    def list_partition_folders(self) -> PrefixListing:
        if not self.root.is_dir():
            raise StorageError(f"raw-images root {self.root} is not a folder")
        prefixes: list[str] = []
        refused: dict[str, str] = {}
        for entry in os.scandir(self.root):
            is_link, is_folder = _kind(Path(entry.path)) == "link", os.path.isdir(entry.path)  # isdir follows links
            if is_link and is_folder:
                refused[shown_name(entry.name)] = "symbolic link to a folder: links are listed, never followed"
            elif is_folder and any(self._walk(Path(entry.path))):
                problem = partition_key_problem(entry.name)
                if problem is None:
                    prefixes.append(entry.name)
                else:
                    refused[shown_name(entry.name)] = problem
        return PrefixListing(sorted(prefixes), refused)

    def list_folder(self, folder: str) -> FolderListing:
        top = self._inside_root(self.root / folder) if folder else self.root
        if not top.is_dir():
            raise StorageError(f"raw-images folder {top} is not a folder")
        objects: list[Path] = []
        folders: list[str] = []
        refused: dict[str, str] = {}
        for entry in os.scandir(top):
            path = Path(entry.path)
            relative = f"{folder}/{entry.name}" if folder else entry.name
            kind = _kind(path)
            if kind == "link" and os.path.isdir(entry.path):  # isdir follows links
                refused[shown_name(relative)] = "symbolic link to a folder: links are listed, never followed"
            elif kind == "folder":
                if any(self._walk(path)):
                    problem = partition_key_problem(entry.name)
                    if problem is None:
                        folders.append(relative)
                    else:
                        refused[shown_name(relative)] = problem
            elif kind in ("file", "link", "unknown"):
                objects.append(path)
        return FolderListing(list(self._infos(sorted(objects))), sorted(folders), refused)

    def list_folder_pages(self, folder: str, start_after: str | None, max_pages: int) -> FolderPage:
        # A local folder is listed whole: a directory read has no pages, and a million entries take seconds.
        return FolderPage(self.list_folder(folder), None)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        top = self.root / prefix
        if prefix and top.is_symlink():
            # A partition registered before its folder became a link: following it would
            # list another partition's images (or anything outside the root) as its own.
            where = (
                "another folder of the root" if top.resolve().is_relative_to(self.root) else "a folder outside the root"
            )
            raise StorageError(
                f"the folder of prefix {prefix!r} is now a symbolic link to {where}: links are never followed"
            )
        folder = self._inside_root(top)
        if folder.is_dir():
            yield from self._infos(sorted(self._walk(folder)))

    def list_root_files(self) -> list[str]:
        names = []
        for entry in os.scandir(self.root):
            kind = _kind(Path(entry.path))
            if kind in ("file", "unknown") or (kind == "link" and not os.path.isdir(entry.path)):
                names.append(shown_name(entry.name))
        return sorted(names)

    def read_bytes(self, uri: str) -> bytes:
        path = local_path_of(uri)
        if path is None:
            raise StorageError(f"{uri!r} is not a local path")
        reason = self.refusal(uri)
        if reason is not None:
            raise ObjectRefused(reason)
        try:
            return self._inside_root(path).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{uri} no longer exists") from exc
        except PermissionError as exc:
            raise ObjectRefused(f"permission denied reading the file ({exc.strerror}): fix its permissions") from exc

    def refusal(self, uri: str) -> str | None:
        path = local_path_of(uri)
        if path is None:
            return None
        kind = _kind(path)
        if kind is None:
            original = _unshown_path(path)
            if original is not None and _kind(original) is not None:
                return _NOT_UTF8
            return None  # gone: reading it says so
        if kind == "link":
            return "symbolic link: not followed (it could lead outside the raw-images root)"
        if kind == "unknown":
            return "cannot be inspected (permission denied on its folder): fix the folder's permissions"
        if kind == "folder":
            try:
                os.scandir(path).close()
            except OSError as exc:
                return (
                    f"folder cannot be listed ({exc.strerror}): its files are not in the manifest; fix its permissions"
                )
            return "folder could not be listed when the manifest was made: materialize the partition again"
        return None

    def _walk(self, folder: Path) -> Iterator[Path]:
        """Files and links below `folder`, and what cannot be listed or inspected (never skipped in silence)."""
        unlisted: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False, onerror=unlisted.append):
            # os.walk puts links to folders among the folders (not descended into)
            for name in [*filenames, *dirnames]:
                path = Path(dirpath) / name
                if _kind(path) in ("file", "link", "unknown"):
                    yield path
            yield from (Path(error.filename) for error in unlisted)
            unlisted.clear()
        yield from (Path(error.filename) for error in unlisted)

    def _infos(self, paths: list[Path]) -> Iterator[ObjectInfo]:
        for path in paths:
            try:
                status: os.stat_result | None = path.lstat()
            except FileNotFoundError:
                continue  # deleted since it was listed
            except OSError:
                status = None  # its folder can be listed but not searched
            yield ObjectInfo(
                uri=shown_name(str(path)),
                key=shown_name(path.relative_to(self.root).as_posix()),
                size_bytes=0 if status is None else status.st_size,
                etag=_etag(path, status),
                last_modified=datetime.fromtimestamp(0 if status is None else status.st_mtime, tz=UTC),
            )

    def _inside_root(self, path: Path) -> Path:
        # A key such as '../x' must never make a run read outside its root.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise StorageError(f"{path} is outside the root {self.root}")
        return resolved


def _unshown_path(path: Path) -> Path | None:
    """The path `shown_name` turned into `path` (its \\xNN back to bytes), or None when it shows none."""
    text = str(path)
    if not _ESCAPED_BYTE.search(text):
        return None
    return Path(_ESCAPED_BYTE.sub(lambda match: chr(0xDC00 + int(match.group(1), 16)), text))


@dataclass(frozen=True)
class S3ObjectStore:
    """Objects under `s3://bucket/root_key/`, listed with paginated ListObjectsV2."""

    client: Any = field(repr=False)
    bucket: str
    root_key: str  # no leading or trailing slash; "" for the whole bucket
    # botocore retries a request until its headers arrive, not a body cut off
    # afterwards: such reads are retried here, this many times in all.
    body_read_attempts: int = 5
    # Keys per listing request; None: S3's own 1,000 (tests use fewer to make many pages of few objects).
    page_keys: int | None = None

    @property
    def root_uri(self) -> str:
        return f"s3://{self.bucket}/{self.root_key}".rstrip("/")

    def list_prefixes(self) -> list[str]:
        return self.list_partition_folders().prefixes

    def list_partition_folders(self) -> PrefixListing:
        root = self._key_prefix("")
        names = [
            common["Prefix"][len(root) : -len("/")]
            for page in self._pages(root, delimiter="/")
            for common in page.get("CommonPrefixes", [])
        ]
        refused = {name: problem for name in names if (problem := partition_key_problem(name)) is not None}
        return PrefixListing(sorted(name for name in names if name not in refused), refused)

    def list_folder(self, folder: str) -> FolderListing:
        start = self._key_prefix(folder)
        root = self._key_prefix("")
        objects: list[ObjectInfo] = []
        names: list[str] = []
        for page in self._pages(start, delimiter="/"):
            objects += [self._info(entry) for entry in page.get("Contents", []) if not entry["Key"].endswith("/")]
            names += [common["Prefix"][len(root) : -len("/")] for common in page.get("CommonPrefixes", [])]
        refused = {
            name: problem for name in names if (problem := partition_key_problem(name.rsplit("/", 1)[-1])) is not None
        }
        return FolderListing(objects, sorted(name for name in names if name not in refused), refused)

    def list_folder_pages(self, folder: str, start_after: str | None, max_pages: int) -> FolderPage:
        start = self._key_prefix(folder)
        root = self._key_prefix("")
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": start, "Delimiter": "/"}
        if self.page_keys is not None:
            arguments["MaxKeys"] = self.page_keys
        if start_after is not None:
            arguments["StartAfter"] = _after_folder(root + start_after)
        objects: list[ObjectInfo] = []
        names: list[str] = []
        last = None
        for _ in range(max(1, max_pages)):
            page = self.client.list_objects_v2(**arguments)
            objects += [self._info(entry) for entry in page.get("Contents", []) if not entry["Key"].endswith("/")]
            names += [common["Prefix"][len(root) : -len("/")] for common in page.get("CommonPrefixes", [])]
            keys = [entry["Key"] for entry in page.get("Contents", [])] + [
                c["Prefix"] for c in page.get("CommonPrefixes", [])
            ]
            last = max(keys, default=last)
            if not page.get("IsTruncated"):
                last = None
                break
            arguments.pop("StartAfter", None)
            arguments["ContinuationToken"] = page["NextContinuationToken"]
        refused = {
            name: problem for name in names if (problem := partition_key_problem(name.rsplit("/", 1)[-1])) is not None
        }
        listing = FolderListing(objects, sorted(name for name in names if name not in refused), refused)
        return FolderPage(listing, None if last is None else last[len(root) :])

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        start = self._key_prefix(prefix)
        for page in self._pages(start):
            for entry in page.get("Contents", []):
                if entry["Key"].endswith("/"):
                    continue  # a "folder" marker made by consoles, not an object with content
                yield self._info(entry)

    def _info(self, entry: dict[str, Any]) -> ObjectInfo:
        key = entry["Key"]
        return ObjectInfo(
            uri=f"s3://{self.bucket}/{key}",
            key=key[len(self._key_prefix("")) :],
            size_bytes=int(entry["Size"]),
            etag=entry["ETag"].strip('"'),
            last_modified=entry["LastModified"].astimezone(UTC),
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
        key = self._key_of(uri)
        reason = self.refusal(uri)
        if reason is not None:
            raise ObjectRefused(reason)
        for attempt in range(1, self.body_read_attempts + 1):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code, status = error.get("Code"), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("NoSuchKey", "404"):
                    raise ObjectMissing(f"{uri} no longer exists") from exc
                if code in _OBJECT_REFUSED_CODES:
                    raise ObjectRefused(f"{_OBJECT_REFUSED_CODES[code]} (S3 {code})") from exc
                if code == "403" and status == 403:
                    # a 403 with no error document (some S3-compatible servers, moto's bucket policies)
                    raise ObjectRefused(f"{_OBJECT_REFUSED_CODES['AccessDenied']} (HTTP 403)") from exc
                raise
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError):
                if attempt == self.body_read_attempts:
                    raise
        raise AssertionError("unreachable")

    def refusal(self, uri: str) -> str | None:
        key = self._key_of(uri)
        if any(segment in (".", "..") for segment in key.split("/")):
            # urllib3 removes dot segments from the request path: the GET would read another object
            return (
                "key has a '.' or '..' path segment, which HTTP clients collapse: reading it would read another object"
            )
        return None

    def _key_of(self, uri: str) -> str:
        # The key exactly as listed: split_s3_uri strips slashes, and '/x.jpg' is not 'x.jpg'.
        bucket_uri = f"s3://{self.bucket}/"
        key = uri[len(bucket_uri) :] if uri.startswith(bucket_uri) else None
        if key is None or not key.startswith(self._key_prefix("")):
            raise StorageError(f"{uri} is outside the root {self.root_uri}")
        return key

    def _key_prefix(self, prefix: str) -> str:
        parts = [part for part in (self.root_key, prefix) if part]
        return "".join(f"{part}/" for part in parts)

    def _pages(self, key_prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        arguments = {"Bucket": self.bucket, "Prefix": key_prefix}
        if delimiter:
            arguments["Delimiter"] = delimiter
        # The paginator follows continuation tokens: a prefix may hold far more than 1,000 objects.
        yield from self.client.get_paginator("list_objects_v2").paginate(**arguments)


def _after_folder(key: str) -> str:
    """Where a listing resumes after `key`: past every key under it when it is a folder (`a/` -> `a0`), since
    S3 lists `a/x` after `a/` and a delimited listing would roll it up into `a/` again."""
    return key[:-1] + chr(ord("/") + 1) if key.endswith("/") else key


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
