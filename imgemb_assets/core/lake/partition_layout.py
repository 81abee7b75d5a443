"""A table's physical partition layout: by `prefix_partition` (today: `partition_value` of the prefix) or by `prefix`
itself (tables created before, read from their metadata until migrated). Which one a table has, the filters that
select one prefix's rows in it, the storage column a write adds, and the checks that a write fits it.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.partition_values import partition_predicate, partition_value
from imgemb_assets.core.lake.tables import PARTITION_COLUMN, PARTITION_STORAGE_COLUMN

# The longest folder or file name a local file system takes (ext4, xfs, APFS, NTFS).
_MAX_NAME_BYTES: Final = 255


def layout_column_of(table: DeltaTable) -> str:
    columns = table.metadata().partition_columns
    return PARTITION_COLUMN if columns == [PARTITION_COLUMN] else PARTITION_STORAGE_COLUMN


def partition_filter(table: DeltaTable, partition_key: str) -> str:
    column = layout_column_of(table)
    if column == PARTITION_COLUMN:
        return partition_predicate(partition_key)
    # the physical value prunes the files; `prefix` makes the answer exact whatever the hash
    return f"{partition_predicate(partition_value(partition_key), column)} AND {partition_predicate(partition_key)}"


def partition_filter_tuple(table: DeltaTable, partition_key: str) -> tuple[str, str, str]:
    """The partition's physical folder as a delta-rs partition filter (no data file is opened)."""
    column = layout_column_of(table)
    return (column, "=", partition_key if column == PARTITION_COLUMN else partition_value(partition_key))


def with_storage_column(
    rows: pa.Table | pa.RecordBatchReader, column: str, value: str
) -> pa.Table | pa.RecordBatchReader:
    """The rows to write, with the physical partition column added when the layout has one."""
    if column == PARTITION_COLUMN:
        return rows
    if column in rows.schema.names:
        raise LakeError(f"{column!r} is written by Lake itself; the rows must not carry it")
    field_ = pa.field(column, pa.string(), nullable=False)
    if isinstance(rows, pa.Table):
        return rows.append_column(field_, pa.array([value] * rows.num_rows, pa.string()))
    schema = rows.schema.append(field_)
    batches = (
        pa.RecordBatch.from_arrays([*batch.columns, pa.array([value] * batch.num_rows, pa.string())], schema=schema)
        for batch in rows
    )
    return pa.RecordBatchReader.from_batches(schema, batches)


def require_single_partition(data: pa.Table | pa.RecordBatch, partition_key: str) -> None:
    # A row with another key would land outside the predicate and survive the
    # next overwrite of its own partition: refuse it instead.
    if data.num_rows == 0:
        return
    keys = pc.unique(data.column(PARTITION_COLUMN)).to_pylist()
    if keys != [partition_key]:
        raise LakeError(f"rows for partition {partition_key!r} carry {PARTITION_COLUMN} values {keys}")


def require_folder_fits(root_uri: str, name: str, partition_key: str) -> None:
    """In a table partitioned by `prefix` itself: LakeError, saying what to do, when the prefix's folder name is too long."""
    # delta-rs percent-encodes the value into a folder name, and panics where
    # the file system refuses it: say what to do instead.
    folder = f"{PARTITION_COLUMN}={quote(partition_key, safe='')}"
    if len(folder.encode()) > _MAX_NAME_BYTES:
        raise LakeError(
            f"{name} was created partitioned by {PARTITION_COLUMN!r}, and prefix {partition_key!r} is too long "
            f"for a folder name there ({len(folder.encode())} bytes once encoded, at most {_MAX_NAME_BYTES}); "
            f"migrate the table once with Lake({root_uri!r}).migrate_partitioning({name!r}) "
            f"(or `python -m imgemb_assets.core.lake migrate <lake uri> {name}`), then materialize again"
        )
