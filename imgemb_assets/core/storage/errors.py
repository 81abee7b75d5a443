"""What the object stores refuse with: `StorageError` and its kinds, each message saying which object and why."""

from __future__ import annotations


class StorageError(Exception):
    """An object or root cannot be used; the message says which and why."""


class ObjectMissing(StorageError):
    """A listed object is gone (deleted since the listing)."""


class ObjectRefused(StorageError):
    """A listed object that is not read (a link, an archived or denied object, ...); the message is the reason."""
