"""Delta Lake tables under a lake root: replace one partition, replace a whole table, read back."""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, QueryBuilder, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from imgemb_assets.core.storage import local_path_of
from imgemb_assets.core.tables import PARTITION_COLUMN

# Two writers of the same partition: delta-rs commits one and fails the other
# with CommitFailedError; the loser rewrites on top of the winner's version.
_COMMIT_ATTEMPTS: Final = 6
_COMMIT_RETRY_BASE_S: Final = 0.2
# Bound the writer's memory: parquet row groups of at most this many rows, and
# files of about this size (a 2048-float embedding row is 8 KiB).
_MAX_ROW_GROUP_ROWS: Final = 16_384
_TARGET_FILE_BYTES: Final = 256 << 20

# Something that can be written more than once: a table, or a function that
# opens a fresh stream of record batches (a retried commit replays it).
Rows = pa.Table | Callable[[], pa.RecordBatchReader]


class LakeError(Exception):
    """A table cannot be written or read as asked; the message says which and why."""


class CommitConflictError(LakeError):
    """Concurrent writers of the same partition kept winning; nothing of this write was committed."""


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

    def write_partition(self, name: str, data: Rows, partition_key: str) -> None:
        """Replace one partition of a table with `data` (which may be empty) in one commit.

        `data` is a table, or a function returning a fresh record-batch stream,
        which is written without holding the whole partition in memory.

        New columns (a sales export that gained one) are merged into the table
        schema; other partitions read them as null until they are rewritten.
        """
        if isinstance(data, pa.Table):
            _require_single_partition(data, partition_key)
        self._ensure_local_parent()
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                write_deltalake(
                    self.table_uri(name),
                    data if isinstance(data, pa.Table) else data(),
                    mode="overwrite",
                    predicate=partition_predicate(partition_key),
                    partition_by=[PARTITION_COLUMN],
                    schema_mode="merge",
                    storage_options=self.storage_options,
                    target_file_size=_TARGET_FILE_BYTES,
                    writer_properties=WriterProperties(max_row_group_size=_MAX_ROW_GROUP_ROWS),
                )
                return
            except CommitFailedError as exc:
                if attempt == _COMMIT_ATTEMPTS:
                    raise CommitConflictError(
                        f"partition {partition_key!r} of {name} kept conflicting with concurrent writers "
                        f"after {attempt} attempts; nothing of this write was committed"
                    ) from exc
                time.sleep(_COMMIT_RETRY_BASE_S * attempt * (1 + random.random()))

    def write_partition_stream(
        self, name: str, batches: Iterable[pa.RecordBatch], schema: pa.Schema, partition_key: str
    ) -> int:
        """Replace one partition with a stream of batches, holding only one batch in memory; the row count.

        The stream is spooled to a local parquet file first, so a commit that
        loses to a concurrent writer can be retried without recomputing it.
        """
        rows = 0
        with tempfile.TemporaryDirectory(prefix="imgemb-spool-") as spool:
            path = f"{spool}/{name}.parquet"
            with pq.ParquetWriter(path, schema) as writer:
                for batch in batches:
                    _require_single_partition(batch, partition_key)
                    writer.write_batch(batch)
                    rows += batch.num_rows

            def replay() -> pa.RecordBatchReader:
                return pa.RecordBatchReader.from_batches(schema, pq.ParquetFile(path).iter_batches(batch_size=4096))

            self.write_partition(name, replay, partition_key)
        return rows

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
        return self.read_batches(name, partition_key, columns).read_all()

    def read_batches(
        self, name: str, partition_key: str | None = None, columns: list[str] | None = None, batch_rows: int = 8192
    ) -> pa.RecordBatchReader:
        """A table or partition as a stream of record batches of at most `batch_rows` rows."""
        table = self._open(name)
        selected = "*" if columns is None else ", ".join(_quote_identifier(column) for column in columns)
        where = "" if partition_key is None else f" WHERE {partition_predicate(partition_key)}"
        engine = QueryBuilder({"datafusion.execution.batch_size": str(batch_rows)}).register("t", table)
        stream = pa.RecordBatchReader.from_stream(engine.execute(f"SELECT {selected} FROM t{where}"))
        schema = without_view_types(stream.schema)
        return pa.RecordBatchReader.from_batches(schema, (batch.cast(schema) for batch in stream))

    def partition_keys(self, name: str) -> list[str]:
        """The partitions holding rows, read from the table's log (no data file is opened)."""
        try:
            table = self._open(name)
        except LakeError:
            return []
        return sorted({partition[PARTITION_COLUMN] for partition in table.partitions()})

    def _open(self, name: str) -> DeltaTable:
        # One load of the table's log; checking `exists` first would read it twice.
        try:
            return DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        except TableNotFoundError as exc:
            raise LakeError(f"Delta table {self.table_uri(name)} does not exist; materialize {name} first") from exc

    def _ensure_local_parent(self) -> None:
        local = local_path_of(self.root_uri)
        if local is not None:
            Path(local).mkdir(parents=True, exist_ok=True)


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def without_view_types(schema: pa.Schema) -> pa.Schema:
    """The query engine returns string_view / binary_view columns; the schemas here use string / binary."""
    fields = []
    for field_ in schema:
        if pa.types.is_string_view(field_.type):
            field_ = field_.with_type(pa.string())
        elif pa.types.is_binary_view(field_.type):
            field_ = field_.with_type(pa.binary())
        fields.append(field_)
    return pa.schema(fields, metadata=schema.metadata)


def _require_single_partition(data: pa.Table | pa.RecordBatch, partition_key: str) -> None:
    # A row with another key would land outside the predicate and survive the
    # next overwrite of its own partition: refuse it instead.
    if data.num_rows == 0:
        return
    keys = pc.unique(data.column(PARTITION_COLUMN)).to_pylist()
    if keys != [partition_key]:
        raise LakeError(f"rows for partition {partition_key!r} carry {PARTITION_COLUMN} values {keys}")
