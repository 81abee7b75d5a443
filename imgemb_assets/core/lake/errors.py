"""What a lake write or read ends with when it cannot do what was asked: `LakeError` and its kinds (a commit that kept
losing to concurrent writers, an input rewritten meanwhile, a partition removed meanwhile)."""

from __future__ import annotations


class LakeError(Exception):
    """A table cannot be written or read as asked; the message says which and why."""


class CommitConflictError(LakeError):
    """Concurrent writers of the same partition kept winning; nothing of this write was committed."""


class InputChangedError(CommitConflictError):
    """The partition a write was computed from was rewritten meanwhile; nothing of this write was committed."""


class PartitionRemovedError(LakeError):
    """The partition was removed (its prefix vanished) while this write was computed; nothing was committed.

    Unlike InputChangedError, a retry cannot succeed: nothing will ask for the partition again.
    """
