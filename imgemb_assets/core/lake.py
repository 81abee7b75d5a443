"""Delta Lake tables under a lake root: replace one partition, replace a whole table, read back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from imgemb_assets.core.storage import local_path_of
from imgemb_assets.core.tables import PARTITION_COLUMN


class LakeError(Exception):
    """A table cannot be written or read as asked; the message says which and why."""


def partition_predicate(partition_key: str) -> str:
    """A Delta predicate matching exactly one partition.

    The key is a SQL string literal with quotes doubled, so no key can close the
    literal and widen the predicate.
    """
    escaped = partition_key.replace("'", "''")
    return f"{PARTITION_COLUMN} = '{escaped}'"


@dataclass(frozen=True)
class Lake:
    root_uri: str
    storage_options: dict[str, str] | None = field(default=None, repr=False)

    def table_uri(self, name: str) -> str:
        local = local_path_of(self.root_uri)
        if local is not None:
            return str(local.resolve() / name)
        return f"{self.root_uri.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.storage_options)

    def write_partition(self, name: str, data: pa.Table, partition_key: str) -> None:
        """Replace one partition of a table with `data` (which may be empty) in one commit.

        New columns (a sales export that gained one) are merged into the table
        schema; other partitions read them as null until they are rewritten.
        """
        _require_single_partition(data, partition_key)
        self._ensure_local_parent()
        write_deltalake(
            self.table_uri(name),
            data,
            mode="overwrite",
            predicate=partition_predicate(partition_key),
            partition_by=[PARTITION_COLUMN],
            schema_mode="merge",
            storage_options=self.storage_options,
        )

    def overwrite(self, name: str, data: pa.Table) -> None:
        """Replace the whole content (and schema) of an unpartitioned table in one commit."""
        self._ensure_local_parent()
        write_deltalake(
            self.table_uri(name),
            data,
            mode="overwrite",
            schema_mode="overwrite",
            storage_options=self.storage_options,
        )

    def read(self, name: str, partition_key: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """A whole table, or one partition of it."""
        if not self.exists(name):
            raise LakeError(f"Delta table {self.table_uri(name)} does not exist; materialize {name} first")
        table = DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        filters = None if partition_key is None else [(PARTITION_COLUMN, "=", partition_key)]
        return table.to_pyarrow_table(filters=filters, columns=columns)

    def schema(self, name: str) -> pa.Schema:
        table = DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        return pa.schema(table.schema().to_arrow())

    def _ensure_local_parent(self) -> None:
        local = local_path_of(self.root_uri)
        if local is not None:
            Path(local).mkdir(parents=True, exist_ok=True)


def _require_single_partition(data: pa.Table, partition_key: str) -> None:
    # A row with another key would land outside the predicate and survive the
    # next overwrite of its own partition: refuse it instead.
    if data.num_rows == 0:
        return
    keys = pc.unique(data.column(PARTITION_COLUMN)).to_pylist()
    if keys != [partition_key]:
        raise LakeError(f"rows for partition {partition_key!r} carry {PARTITION_COLUMN} values {keys}")
