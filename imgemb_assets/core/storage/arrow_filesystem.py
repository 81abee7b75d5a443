"""pyarrow's view of a place in the lake: a local folder or an S3 location, reached like delta-rs reaches it.

The lake's Delta tables are written by delta-rs; the files written beside or into them
by pyarrow (the search index, staged vectors, the data files of a streamed partition
write) go through the filesystem returned here, configured from the same storage
options (`S3Settings.delta_storage_options`), so both see the same bucket with the
same credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from imgemb_assets.core.storage.names import local_path_of


class UnsupportedLocation(ValueError):
    """Neither a local folder nor an s3:// location."""


@dataclass(frozen=True)
class ArrowLocation:
    filesystem: pafs.FileSystem
    path: str  # the location as `filesystem` names it
    is_local: bool
    # what the S3 filesystem was built from: a boto3 client for the same bucket is built from it too
    storage_options: Mapping[str, str] | None = None

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"


def arrow_location(uri: str, storage_options: Mapping[str, str] | None) -> ArrowLocation:
    """`uri` (a local path or s3://bucket/key) with a pyarrow filesystem that reaches it."""
    local = local_path_of(uri)
    if local is not None:
        return ArrowLocation(pafs.LocalFileSystem(), str(local), True)
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        raise UnsupportedLocation(f"{uri!r}: only a local folder or s3:// is supported")
    return ArrowLocation(
        s3_filesystem(storage_options), f"{parsed.netloc}{parsed.path}".rstrip("/"), False, storage_options
    )


def s3_filesystem(options: Mapping[str, str] | None) -> pafs.S3FileSystem:
    """pyarrow's S3 client configured like delta-rs (`S3Settings.delta_storage_options`)."""
    if options is None:
        return pafs.S3FileSystem()  # the AWS variables and default chain, as delta-rs without options
    arguments: dict[str, Any] = {
        "access_key": options.get("AWS_ACCESS_KEY_ID"),
        "secret_key": options.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": options.get("AWS_SESSION_TOKEN"),
        "region": options.get("AWS_REGION"),
    }
    endpoint = options.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint)
        arguments["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/") if parsed.scheme else endpoint
        arguments["scheme"] = parsed.scheme or "https"
    if options.get("AWS_ALLOW_HTTP", "").lower() == "true" and not endpoint:
        arguments["scheme"] = "http"
    if "connect_timeout" in options:
        arguments["connect_timeout"] = _seconds(options["connect_timeout"])
    if "timeout" in options:
        arguments["request_timeout"] = _seconds(options["timeout"])
    return pafs.S3FileSystem(**{key: value for key, value in arguments.items() if value is not None})


def _seconds(duration: str) -> float:
    # delta-rs durations as S3Settings writes them: "10000ms"
    return float(duration.removesuffix("ms")) / 1000 if duration.endswith("ms") else float(duration.removesuffix("s"))
