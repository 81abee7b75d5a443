"""Delta Lake tables under a lake root: replace one partition, replace a whole table, read back."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, QueryBuilder, write_deltalake
from deltalake.exceptions import CommitFailedError

from imgemb_assets.core.storage import local_path_of
from imgemb_assets.core.tables import PARTITION_COLUMN

# Two writers of the same partition: delta-rs commits one and fails the other
# with CommitFailedError; the loser rewrites on top of the winner's version.
_COMMIT_ATTEMPTS: Final = 6
_COMMIT_RETRY_BASE_S: Final = 0.2


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
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                write_deltalake(
                    self.table_uri(name),
                    data,
                    mode="overwrite",
                    predicate=partition_predicate(partition_key),
                    partition_by=[PARTITION_COLUMN],
                    schema_mode="merge",
                    storage_options=self.storage_options,
                )
                return
            except CommitFailedError as exc:
                if attempt == _COMMIT_ATTEMPTS:
                    raise LakeError(
                        f"partition {partition_key!r} of {name} kept conflicting with concurrent writers "
                        f"after {attempt} attempts; nothing of this write was committed"
                    ) from exc
                time.sleep(_COMMIT_RETRY_BASE_S * attempt * (1 + random.random()))

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
        """A whole table, or one partition of it.

        Read through delta-rs's own query engine: reading through a pyarrow
        dataset over delta-rs's filesystem aborts the process at exit now and
        then ("terminate called without an active exception").
        """
        if not self.exists(name):
            raise LakeError(f"Delta table {self.table_uri(name)} does not exist; materialize {name} first")
        table = DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        selected = "*" if columns is None else ", ".join(_quote_identifier(column) for column in columns)
        where = "" if partition_key is None else f" WHERE {partition_predicate(partition_key)}"
        batches = QueryBuilder().register("t", table).execute(f"SELECT {selected} FROM t{where}")
        return _without_view_types(pa.table(batches))

    def schema(self, name: str) -> pa.Schema:
        table = DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        return pa.schema(table.schema().to_arrow())

    def _ensure_local_parent(self) -> None:
        local = local_path_of(self.root_uri)
        if local is not None:
            Path(local).mkdir(parents=True, exist_ok=True)


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _without_view_types(table: pa.Table) -> pa.Table:
    """The query engine returns string_view / binary_view columns; the schemas here use string / binary."""
    fields = []
    for field_ in table.schema:
        if pa.types.is_string_view(field_.type):
            field_ = field_.with_type(pa.string())
        elif pa.types.is_binary_view(field_.type):
            field_ = field_.with_type(pa.binary())
        fields.append(field_)
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def _require_single_partition(data: pa.Table, partition_key: str) -> None:
    # A row with another key would land outside the predicate and survive the
    # next overwrite of its own partition: refuse it instead.
    if data.num_rows == 0:
        return
    keys = pc.unique(data.column(PARTITION_COLUMN)).to_pylist()
    if keys != [partition_key]:
        raise LakeError(f"rows for partition {partition_key!r} carry {PARTITION_COLUMN} values {keys}")
