"""What every command of `imgemb` shares: the one-line error an operator can act on, required variables, the lake of a URI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from imgemb_assets.core.storage.s3 import S3Settings

if TYPE_CHECKING:
    from imgemb_assets.core.lake.lake import Lake


class CommandError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def required_env(name: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name)
    if not value:
        raise CommandError(f"{name} is not set")
    return value


def lake_of(lake_uri: str) -> Lake:
    # As the location's StorageResource.lake() builds it, from the standard AWS variables.
    from imgemb_assets.core.lake.lake import Lake

    if lake_uri.startswith("s3://"):
        return Lake(lake_uri, storage_options=S3Settings().delta_storage_options_provider())
    return Lake(lake_uri)
