"""The lake (`Lake`): Delta Lake tables under a lake root: replace one partition, replace a whole table, read back.

A partitioned table is physically partitioned by `prefix_partition`, a short
value derived from the prefix (`partition_values.py`), so that any prefix S3 accepts
makes a valid folder name; Lake adds that column on write and drops it on read,
and `prefix` stays a data column to filter by. A table created before keeps its
layout (partitioned by `prefix` itself, `partition_layout.py`), read from its
metadata, until it is migrated with `Lake.migrate_partitioning`. Each commit is
retried against concurrent writers (`commits.py`); a streamed write's data files are
written by pyarrow (`data_files.py`).
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeAlias, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, QueryBuilder, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

# Called through its module, so that a test can hold or refuse a commit where it happens.
from imgemb_assets.core.lake import commits
from imgemb_assets.core.lake.commits import Precondition
from imgemb_assets.core.lake.data_files import (
    MAX_ROW_GROUP_ROWS,
    TARGET_FILE_BYTES,
    DataFiles,
    same_columns,
    without_column,
)
from imgemb_assets.core.lake.errors import InputChangedError, LakeError
from imgemb_assets.core.lake.partition_layout import (
    layout_column_of,
    partition_filter,
    partition_filter_tuple,
    require_folder_fits,
    require_single_partition,
    with_storage_column,
)
from imgemb_assets.core.lake.partition_values import partition_predicate, partition_value, quote_identifier, sql_string
from imgemb_assets.core.lake.tables import PARTITION_COLUMN, PARTITION_STORAGE_COLUMN
from imgemb_assets.core.storage.arrow_filesystem import arrow_location
from imgemb_assets.core.storage.names import local_path_of
from imgemb_assets.core.storage.s3 import (
    S3AccessDenied,
    S3ConfigError,
    access_denied_refusal,
    refuse_credentials_in_uri,
)

# Something that can be written more than once: a table, or a function that
# opens a fresh stream of record batches (a retried commit replays it).
Rows: TypeAlias = pa.Table | Callable[[], pa.RecordBatchReader]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _refusing_denied_access(method: Callable[Concatenate[Lake, _P], _R]) -> Callable[Concatenate[Lake, _P], _R]:
    """The method, with S3 denying access to the lake (403) raised as one S3AccessDenied line naming the bucket.

    delta-rs and pyarrow report a 403 as an OSError of many lines (request URLs, S3's XML answer)
    that a Dagster step would retry and the CLI print as a traceback; it fails the same way until
    the credentials or policies change.
    """

    @functools.wraps(method)
    def refusing(self: Lake, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except S3AccessDenied:
            raise  # refused by a nested call already
        except Exception as exc:
            refusal = self.denied_access_refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc

    return refusing


@dataclass(frozen=True)
class Lake:
    root_uri: str
    # Options, or a function returning them (core.s3.DeltaStorageOptions), called at
    # each Delta operation so that expiring credentials are current when it starts.
    storage_options: dict[str, str] | Callable[[], dict[str, str]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        refuse_credentials_in_uri(self.root_uri)  # before the URI reaches any message
        if self.root_uri.startswith("s3://") and not self.root_uri[len("s3://") :].partition("/")[0]:
            # delta-rs would take `s3:///name` for a table and fail with a parse error on first use
            raise S3ConfigError(f"the lake root {self.root_uri!r} names no bucket: write s3://<bucket>/<folder>")

    def denied_access_refusal(self, error: BaseException) -> S3AccessDenied | None:
        """`error` as one line naming the lake and its bucket, when it is S3 denying access (403); else None."""
        return access_denied_refusal(error, self.root_uri, "the lake")

    def current_storage_options(self) -> dict[str, str] | None:
        options = self.storage_options
        return options() if callable(options) else options

    def table_uri(self, name: str) -> str:
        local = local_path_of(self.root_uri)
        if local is not None:
            return str(local.resolve() / name)
        return f"{self.root_uri.rstrip('/')}/{name}"

    @_refusing_denied_access
    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.current_storage_options())

    @_refusing_denied_access
    def write_partition(
        self, name: str, data: Rows, partition_key: str, precondition: Precondition | None = None
    ) -> None:
        """Replace one partition of a table with `data` (which may be empty) in one commit.

        `data` is a table, or a function returning a fresh record-batch stream,
        which is written without holding the whole partition in memory.

        New columns (a sales export that gained one) are merged into the table
        schema; other partitions read them as null until they are rewritten.
        """
        if not partition_key:
            raise LakeError(f"an empty prefix is no partition of {name} (it would stand for the whole root)")
        if isinstance(data, pa.Table):
            require_single_partition(data, partition_key)
        self._ensure_local_parent()
        layout_column = self._layout_column(name)
        if layout_column == PARTITION_COLUMN:
            require_folder_fits(self.root_uri, name, partition_key)
            value = partition_key
        else:
            value = partition_value(partition_key)

        commit = self._overwrite_where(
            name,
            lambda: with_storage_column(data if isinstance(data, pa.Table) else data(), layout_column, value),
            partition_predicate(value, layout_column),
            layout_column,
        )
        commits.commit_with_retries(commit, f"partition {partition_key!r} of {name}", precondition)

    @_refusing_denied_access
    def replace_partitions(self, name: str, data: pa.Table, partition_keys: Sequence[str]) -> None:
        """Replace several partitions with `data` in one commit: each key's rows become those of `data` (maybe none).

        For tables derived many partitions at a time (the search index's near
        duplicates): one commit, not one per partition, on a first build over
        thousands of prefixes.
        """
        keys = list(dict.fromkeys(partition_keys))
        if not keys:
            return
        if "" in keys:
            raise LakeError(f"an empty prefix is no partition of {name} (it would stand for the whole root)")
        stray = set(pc.unique(data.column(PARTITION_COLUMN)).to_pylist()) - set(keys) if data.num_rows else set()
        if stray:
            raise LakeError(f"rows for partitions {sorted(stray)[:5]} of {name} are not among those replaced")
        self._ensure_local_parent()
        layout_column = self._layout_column(name)
        if layout_column == PARTITION_COLUMN:
            for key in keys:
                require_folder_fits(self.root_uri, name, key)
            values, rows = keys, data
        else:
            values = [partition_value(key) for key in keys]
            per_row = [partition_value(key) for key in data.column(PARTITION_COLUMN).to_pylist()]
            rows = data.append_column(
                pa.field(layout_column, pa.string(), nullable=False), pa.array(per_row, pa.string())
            )
        listed = ", ".join(sql_string(value) for value in values)
        commit = self._overwrite_where(name, lambda: rows, f"{layout_column} IN ({listed})", layout_column)
        commits.commit_with_retries(commit, f"{len(keys)} partitions of {name}")

    def _overwrite_where(
        self, name: str, rows: Callable[[], pa.Table | pa.RecordBatchReader], predicate: str, layout_column: str
    ) -> Callable[[], None]:
        """One commit replacing the rows that match `predicate` with `rows()` (called afresh on each attempt)."""

        def commit() -> None:
            write_deltalake(
                self.table_uri(name),
                rows(),
                mode="overwrite",
                predicate=predicate,
                partition_by=[layout_column],
                schema_mode="merge",
                storage_options=self.current_storage_options(),
                target_file_size=TARGET_FILE_BYTES,
                writer_properties=WriterProperties(max_row_group_size=MAX_ROW_GROUP_ROWS),
            )

        return commit

    @_refusing_denied_access
    def delete_partition(self, name: str, partition_key: str) -> int:
        """Remove every row of one partition in one commit (its files leave the table, none is rewritten); the rows removed.

        Readers of earlier versions go on reading them until a vacuum past the retention removes the files.
        """
        return self._delete_where(
            name, lambda table: partition_filter(table, partition_key), f"partition {partition_key!r} of {name}"
        )

    @_refusing_denied_access
    def delete_rows_where_in(self, name: str, column: str, values: Sequence[str]) -> int:
        """Remove every row whose `column` holds one of `values`, in one commit; the rows removed (0 without a table)."""
        if not values:
            return 0
        listed = ", ".join(sql_string(value) for value in dict.fromkeys(values))
        return self._delete_where(
            name,
            lambda table: f"{quote_identifier(column)} IN ({listed})",
            f"rows of {name} whose {column} is one of {len(values)} values",
        )

    def _delete_where(self, name: str, predicate: Callable[[DeltaTable], str], what: str) -> int:
        """One commit deleting the rows `predicate(table)` selects; the rows removed (0 without a table)."""
        try:
            self._open(name)
        except LakeError:
            return 0
        deleted = 0

        def commit() -> None:
            nonlocal deleted
            table = self._open(name)  # each attempt deletes from the newest version
            metrics = table.delete(predicate(table))
            deleted = int(metrics.get("num_deleted_rows") or 0)

        commits.commit_with_retries(commit, what)
        return deleted

    @_refusing_denied_access
    def write_partition_stream(
        self,
        name: str,
        batches: Iterable[pa.RecordBatch],
        schema: pa.Schema,
        partition_key: str,
        precondition: Precondition | None = None,
    ) -> int:
        """Replace one partition with a stream of batches, holding only about one batch in memory; the row count.

        delta-rs 1.6 collects a write's whole input in memory before writing it (delta-rs
        issues 2255, 3578), which made a step's memory grow with its partition. So once the
        table exists with this schema, the batches are written by pyarrow as parquet data
        files straight into the table's folder and committed by delta-rs in one transaction
        that replaces the partition (`create_write_transaction`); a commit that loses to a
        concurrent writer is retried with the same files. A first write creates the table,
        empty, just before its commit; a write that changes the table's columns goes through
        delta-rs's own write, spooled to a local file.
        """
        if not partition_key:
            raise LakeError(f"an empty prefix is no partition of {name} (it would stand for the whole root)")
        try:
            table: DeltaTable | None = self._open(name)
        except LakeError:
            table = None  # created just before the commit: a write killed before it leaves no table
        layout_column = PARTITION_STORAGE_COLUMN if table is None else layout_column_of(table)
        if table is not None:
            stored_schema = without_column(pa.schema(table.schema().to_arrow()), PARTITION_STORAGE_COLUMN)
            if not same_columns(stored_schema, schema):
                return self._write_spooled(name, batches, schema, partition_key, precondition)
        if layout_column == PARTITION_COLUMN:
            require_folder_fits(self.root_uri, name, partition_key)
            value = partition_key
        else:
            value = partition_value(partition_key)
        written = DataFiles(
            arrow_location(self.table_uri(name), self.current_storage_options()),
            layout_column,
            value,
            without_column(schema, layout_column),
        )
        try:
            rows = written.write(batches, partition_key)
            if table is None:
                self._create_empty(name, schema)

            def commit() -> None:
                latest = self._open(name)  # each attempt commits on top of the newest version
                latest.create_write_transaction(
                    list[AddAction | RemoveAction](written.actions),
                    mode="overwrite",
                    schema=latest.schema(),
                    partition_by=[layout_column],
                    partition_filters=[(layout_column, "=", value)],
                )

            commits.commit_with_retries(commit, f"partition {partition_key!r} of {name}", precondition)
        except BaseException:
            written.delete()  # never committed: nothing names them
            raise
        return rows

    def _create_empty(self, name: str, schema: pa.Schema) -> DeltaTable:
        """The table with no rows, partitioned in today's layout (one a concurrent writer created first is kept)."""
        self._ensure_local_parent()
        return DeltaTable.create(
            self.table_uri(name),
            schema=schema.append(pa.field(PARTITION_STORAGE_COLUMN, pa.string(), nullable=False)),
            mode="ignore",
            partition_by=[PARTITION_STORAGE_COLUMN],
            storage_options=self.current_storage_options(),
        )

    def _write_spooled(
        self,
        name: str,
        batches: Iterable[pa.RecordBatch],
        schema: pa.Schema,
        partition_key: str,
        precondition: Precondition | None,
    ) -> int:
        """delta-rs's own write of a stream, spooled to a local parquet file so a lost commit can be retried."""
        rows = 0
        with tempfile.TemporaryDirectory(prefix="imgemb-spool-") as spool:
            path = f"{spool}/{name}.parquet"
            with pq.ParquetWriter(path, schema) as writer:
                for batch in batches:
                    require_single_partition(batch, partition_key)
                    writer.write_batch(batch)
                    rows += batch.num_rows

            def replay() -> pa.RecordBatchReader:
                return pa.RecordBatchReader.from_batches(schema, pq.ParquetFile(path).iter_batches(batch_size=4096))

            self.write_partition(name, replay, partition_key, precondition)
        return rows

    @_refusing_denied_access
    def partition_files(self, name: str, partition_key: str | None = None) -> frozenset[str]:
        """The data files holding one partition (or the whole table) now; none for a missing table.

        Every write names new files, so two different sets mean the partition
        was rewritten in between.
        """
        try:
            table = self._open(name)
        except LakeError:
            return frozenset()
        if partition_key is None:
            return frozenset(table.file_uris())
        return frozenset(table.file_uris(file_pruning_predicate=[partition_filter_tuple(table, partition_key)]))

    @_refusing_denied_access
    def partition_fingerprints(self, name: str) -> dict[str, str]:
        """Each prefix's fingerprint of the data files holding it now, from one read of the table's log.

        Every write names new files, so a partition's fingerprint changes exactly
        when it is rewritten: what a reader that keeps a derived copy per partition
        (the search index) compares to find the partitions to update.
        """
        try:
            table = self._open(name)
        except LakeError:
            return {}
        column = layout_column_of(table)
        actions = pa.table(table.get_add_actions(flatten=True)).select(["path", f"partition.{column}"]).to_pydict()
        files: dict[str, list[str]] = {}
        for path, value in zip(actions["path"], actions[f"partition.{column}"], strict=True):
            files.setdefault(value, []).append(path)
        # A hashed layout's folder value is derived from the prefix: map it back through the prefixes.
        prefix_of = (
            {value: value for value in files}
            if column == PARTITION_COLUMN
            else {partition_value(prefix): prefix for prefix in self.partition_keys(name)}
        )
        return {
            prefix_of[value]: hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()[:32]
            for value, paths in files.items()
            if value in prefix_of
        }

    @_refusing_denied_access
    def unchanged_since(self, name: str, partition_key: str | None = None) -> Precondition:
        """A precondition: the partition (or the whole table) still holds the files it holds now.

        Take it before reading a partition to compute another from it: a write
        whose input was rewritten meanwhile is abandoned (and retried on the new
        rows) rather than committed over a newer result.
        """
        before = self.partition_files(name, partition_key)

        def check() -> None:
            if self.partition_files(name, partition_key) != before:
                what = name if partition_key is None else f"partition {partition_key!r} of {name}"
                raise InputChangedError(
                    f"{what} was rewritten while it was being read; nothing was committed, a retry reads the new rows"
                )

        return check

    @_refusing_denied_access
    def overwrite(self, name: str, data: pa.Table) -> None:
        """Replace the whole content (and schema) of an unpartitioned table in one commit."""
        self._ensure_local_parent()
        write_deltalake(
            self.table_uri(name),
            data,
            mode="overwrite",
            schema_mode="overwrite",
            storage_options=self.current_storage_options(),
        )

    @_refusing_denied_access
    def migrate_partitioning(self, name: str) -> bool:
        """Rewrite a table created partitioned by `prefix` in today's layout, in one commit; whether it had to.

        Readers of the old version go on reading it; the rows are streamed, never all in memory.
        """
        table = self._open(name)
        if table.metadata().partition_columns != [PARTITION_COLUMN]:
            return False
        rows = self.read_batches(name)
        schema = rows.schema.append(pa.field(PARTITION_STORAGE_COLUMN, pa.string(), nullable=False))

        def with_values() -> Iterable[pa.RecordBatch]:
            for batch in rows:
                values = [partition_value(prefix) for prefix in batch.column(PARTITION_COLUMN).to_pylist()]
                yield pa.RecordBatch.from_arrays([*batch.columns, pa.array(values, pa.string())], schema=schema)

        write_deltalake(
            self.table_uri(name),
            pa.RecordBatchReader.from_batches(schema, with_values()),
            mode="overwrite",
            schema_mode="overwrite",
            partition_by=[PARTITION_STORAGE_COLUMN],
            storage_options=self.current_storage_options(),
            target_file_size=TARGET_FILE_BYTES,
            writer_properties=WriterProperties(max_row_group_size=MAX_ROW_GROUP_ROWS),
        )
        return True

    @_refusing_denied_access
    def read(self, name: str, partition_key: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """A whole table, or one partition of it.

        Read through delta-rs's own query engine: reading through a pyarrow
        dataset over delta-rs's filesystem aborts the process at exit now and
        then ("terminate called without an active exception").
        """
        return self.read_batches(name, partition_key, columns).read_all()

    @_refusing_denied_access
    def read_batches(
        self, name: str, partition_key: str | None = None, columns: list[str] | None = None, batch_rows: int = 8192
    ) -> pa.RecordBatchReader:
        """A table or partition as a stream of record batches of at most `batch_rows` rows (never `prefix_partition`)."""
        table = self._open(name)
        if columns is None:
            columns = [field_.name for field_ in table.schema().fields if field_.name != PARTITION_STORAGE_COLUMN]
        selected = ", ".join(quote_identifier(column) for column in columns)
        where = "" if partition_key is None else f" WHERE {partition_filter(table, partition_key)}"
        # One scan partition: the engine otherwise reads ahead a row group (up to 128 MB) per core at
        # once, which doubled a streamed read's memory; the steps consume one batch at a time anyway.
        engine = QueryBuilder(
            {"datafusion.execution.batch_size": str(batch_rows), "datafusion.execution.target_partitions": "1"}
        ).register("t", table)
        stream = pa.RecordBatchReader.from_stream(engine.execute(f"SELECT {selected} FROM t{where}"))
        schema = without_view_types(stream.schema)
        batches = self._refused_when_denied(batch.cast(schema) for batch in stream)
        return pa.RecordBatchReader.from_batches(schema, batches)

    def _refused_when_denied(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """A stream read after `read_batches` returned: a 403 then is refused in one line too."""
        try:
            yield from batches
        except Exception as exc:
            refusal = self.denied_access_refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc

    @_refusing_denied_access
    def schema(self, name: str) -> pa.Schema:
        """The table's columns as `read` returns them (never `prefix_partition`), from its log: no data is read."""
        return without_view_types(
            without_column(pa.schema(self._open(name).schema().to_arrow()), PARTITION_STORAGE_COLUMN)
        )

    @_refusing_denied_access
    def partition_keys(self, name: str) -> list[str]:
        """The prefixes holding rows: from the table's log, and the `prefix` column of hashed partitions only."""
        try:
            table = self._open(name)
        except LakeError:
            return []
        column = layout_column_of(table)
        values = {partition[column] for partition in table.partitions()}
        if column == PARTITION_COLUMN:
            return sorted(values)
        plain = {value for value in values if "~" not in value}
        hashed = sorted(values - plain)
        if not hashed:
            return sorted(plain)
        listed = ", ".join(sql_string(value) for value in hashed)
        engine = QueryBuilder().register("t", table)
        query = f"SELECT DISTINCT {PARTITION_COLUMN} FROM t WHERE {PARTITION_STORAGE_COLUMN} IN ({listed})"
        found = pa.RecordBatchReader.from_stream(engine.execute(query)).read_all().column(0).to_pylist()
        return sorted(plain | {str(prefix) for prefix in found})

    def _layout_column(self, name: str) -> str:
        """The column a table is physically partitioned by: its own for an existing table, today's for a new one."""
        try:
            return layout_column_of(self._open(name))
        except LakeError:
            return PARTITION_STORAGE_COLUMN

    def _open(self, name: str) -> DeltaTable:
        # One load of the table's log; checking `exists` first would read it twice.
        try:
            return DeltaTable(self.table_uri(name), storage_options=self.current_storage_options())
        except TableNotFoundError as exc:
            raise LakeError(f"Delta table {self.table_uri(name)} does not exist; materialize {name} first") from exc

    def _ensure_local_parent(self) -> None:
        local = local_path_of(self.root_uri)
        if local is not None:
            Path(local).mkdir(parents=True, exist_ok=True)


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
