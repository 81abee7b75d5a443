"""One Delta commit, retried until it wins against concurrent writers of the same partition (`commit_with_retries`),
and the preconditions checked before each attempt (`Precondition`, `all_of`)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Final

from deltalake.exceptions import CommitFailedError

from imgemb_assets.core.lake.errors import CommitConflictError

# Two writers of the same partition: delta-rs commits one and fails the other
# with CommitFailedError; the loser rewrites on top of the winner's version.
_COMMIT_ATTEMPTS: Final = 6
_COMMIT_RETRY_BASE_S: Final = 0.2

# Called just before each commit attempt; raises InputChangedError (a retry reads the new input) or
# PartitionRemovedError (the partition is gone) to abandon the write.
Precondition = Callable[[], None]


def all_of(*preconditions: Precondition) -> Precondition:
    def check() -> None:
        for precondition in preconditions:
            precondition()

    return check


def commit_with_retries(commit: Callable[[], None], what: str, precondition: Precondition | None = None) -> None:
    """Run `commit` until it wins against concurrent writers of the same partition, checking `precondition` first each time."""
    for attempt in range(1, _COMMIT_ATTEMPTS + 1):
        if precondition is not None:
            precondition()
        try:
            commit()
            return
        except CommitFailedError as exc:
            if attempt == _COMMIT_ATTEMPTS:
                raise CommitConflictError(
                    f"{what} kept conflicting with concurrent writers after {attempt} attempts; "
                    "nothing of this write was committed"
                ) from exc
            time.sleep(_COMMIT_RETRY_BASE_S * attempt * (1 + random.random()))
