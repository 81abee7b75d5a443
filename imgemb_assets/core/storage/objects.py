"""What every object store offers (the `ObjectStore` protocol), what its listings return (`ObjectInfo`, the
listings of partition folders and of one folder). What it refuses with (`StorageError` and its kinds) is in
`errors.py`.

Assets only see this protocol and `open_object_store` (`open_store.py`), so a scheme
slots in beside `local_store.py` and `s3_store.py` without touching them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


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
