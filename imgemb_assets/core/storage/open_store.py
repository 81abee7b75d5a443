"""`open_object_store`: the object store a root URI names, a local folder or an `s3://` prefix."""

from __future__ import annotations

from urllib.parse import urlparse

from imgemb_assets.core.storage.errors import StorageError
from imgemb_assets.core.storage.local_store import LocalObjectStore
from imgemb_assets.core.storage.names import local_path_of
from imgemb_assets.core.storage.objects import ObjectStore
from imgemb_assets.core.storage.s3 import S3Settings, split_s3_uri
from imgemb_assets.core.storage.s3_store import S3ObjectStore


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
