"""The partition scheme a lake was written with, recorded in the lake itself, and the refusal of any other.

Two schemes cut the same objects into different partitions: writing a lake
under a second one would leave an object's rows in two partitions (duplicated
vectors) or orphaned under keys nothing lists. So the first discovery or
manifest write records the scheme in a one-row Delta table `_partition_scheme`
beside the others, and every later one compares. The documented migration is a
new lake (`IMGEMB_LAKE_URI`) and a new Dagster instance (`DAGSTER_HOME`): the
partitions are registered and embedded anew there.

A lake written before schemes existed holds first-level folders only, which is
what the default scheme makes of them, so it is taken as written with the
default (its loose objects simply become new partitions).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import pyarrow as pa

from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import PARTITION_SCHEME_TABLE, PARTITION_SCHEME_TABLE_SCHEMA, RAW_IMAGE_MANIFEST

# The scheme of lakes written before it was recorded: one partition per first-level folder.
UNRECORDED_SCHEME: Final = PartitionScheme()


class SchemeMismatchError(Exception):
    """The lake was written with another partition scheme; the message says which and what to do."""


def recorded_scheme(lake: Lake) -> PartitionScheme | None:
    """The scheme the lake records; the default for a lake written before schemes; None for a new lake."""
    if lake.exists(PARTITION_SCHEME_TABLE):
        rows = lake.read(PARTITION_SCHEME_TABLE, columns=["scheme"]).column("scheme").to_pylist()
        if rows:
            return PartitionScheme.parse(rows[0])
    return UNRECORDED_SCHEME if lake.exists(RAW_IMAGE_MANIFEST) else None


def require_scheme(lake: Lake, scheme: PartitionScheme) -> None:
    """Record `scheme` in a new lake, or check that the lake was written with it (SchemeMismatchError if not)."""
    recorded = recorded_scheme(lake)
    if recorded is None or (recorded == scheme and not lake.exists(PARTITION_SCHEME_TABLE)):
        lake.overwrite(PARTITION_SCHEME_TABLE, _record(scheme))
        return
    if recorded != scheme:
        raise SchemeMismatchError(
            f"the lake {lake.root_uri} was written with partition scheme {str(recorded)!r}, and "
            f"IMGEMB_PARTITION_SCHEME asks for {str(scheme)!r}: the same objects would land in other partitions "
            f"(duplicated or orphaned rows). Set IMGEMB_PARTITION_SCHEME={str(recorded)!r}, or start a new lake "
            "(IMGEMB_LAKE_URI) with a new Dagster instance (DAGSTER_HOME) for the new scheme."
        )


def _record(scheme: PartitionScheme) -> pa.Table:
    return pa.Table.from_pylist(
        [{"scheme": str(scheme), "recorded_at": datetime.now(UTC)}], schema=PARTITION_SCHEME_TABLE_SCHEMA
    )
