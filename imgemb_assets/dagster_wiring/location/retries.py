"""Which step failures Dagster retries: transient ones, never bad input or bad settings.

Every asset carries `STEP_RETRY_POLICY`. S3 throttling, dropped connections and
stalls are first retried inside the clients (botocore, delta-rs); a step that
still fails on one of them, or loses a commit race too often, is re-run after
a back-off. A corrupt sales export, a missing table, a wrong setting or an
access-denied bucket fails the same way every time, so `permanent_failures`
turns those into a `Failure` that no retry policy repeats.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import dagster as dg
from botocore.exceptions import ClientError

from imgemb_assets.core.embedding.model_settings import ModelConfigError
from imgemb_assets.core.ingest.partition_scheme import PartitionSchemeError
from imgemb_assets.core.ingest.scheme_record import SchemeMismatchError
from imgemb_assets.core.lake.errors import CommitConflictError, LakeError
from imgemb_assets.core.sales.join import SalesError
from imgemb_assets.core.storage.errors import StorageError
from imgemb_assets.core.storage.s3 import S3ConfigError

# 2 s, 4 s, 8 s (each +-50%): long enough for throttling to ease.
STEP_RETRY_POLICY: Final = dg.RetryPolicy(
    max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)

_PERMANENT_ERRORS: Final = (
    SalesError,
    ModelConfigError,
    S3ConfigError,
    StorageError,
    LakeError,
    SchemeMismatchError,
    PartitionSchemeError,
)
# S3 answers that a retry can change: throttling and server-side errors.
_TRANSIENT_HTTP_STATUS: Final = frozenset({408, 429}) | frozenset(range(500, 600))


@contextmanager
def permanent_failures() -> Iterator[None]:
    """Re-raise errors that cannot go away on their own as a Failure that is not retried."""
    try:
        yield
    except CommitConflictError:
        raise  # lost to concurrent writers: a later attempt can win
    except S3ConfigError as exc:
        # Already one line naming the bucket or setting and what to do (S3AccessDenied among them):
        # it is the failure's whole message.
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    except _PERMANENT_ERRORS as exc:
        raise dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in _TRANSIENT_HTTP_STATUS:
            raise
        raise dg.Failure(description=f"S3 refused the request (HTTP {status}): {exc}", allow_retries=False) from exc
