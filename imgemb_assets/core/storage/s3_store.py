"""The objects under an `s3://bucket/prefix/` (`S3ObjectStore`): paginated ListObjectsV2 listings, and GETs whose
body is read again when cut off and whose per-object refusals (archived, denied) are named."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Final

from botocore.exceptions import ClientError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

from imgemb_assets.core.storage.errors import ObjectMissing, ObjectRefused, StorageError
from imgemb_assets.core.storage.names import partition_key_problem
from imgemb_assets.core.storage.objects import FolderListing, FolderPage, ObjectInfo, PrefixListing

# S3 answers to a GET that concern that one object, not the caller's identity or
# settings (an expired token or a skewed clock fails every object and stays a failure).
_OBJECT_REFUSED_CODES: Final = {
    "InvalidObjectState": "archived (S3 Glacier / Deep Archive / archive tier): restore it, then materialize the partition again",
    "AccessDenied": "access denied: grant read access to it, then materialize the partition again",
}


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
