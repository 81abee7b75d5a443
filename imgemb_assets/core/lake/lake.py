"""Delta Lake tables under a lake root: replace one partition, replace a whole table, read back.

A partitioned table is physically partitioned by `prefix_partition`, a short
value derived from the prefix (`partition_value`), so that any prefix S3 accepts
makes a valid folder name; Lake adds that column on write and drops it on read,
and `prefix` stays a data column to filter by. A table created before keeps its
layout (partitioned by `prefix` itself), read from its metadata, until it is
migrated with `Lake.migrate_partitioning`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, Final, ParamSpec, TypeAlias, TypeVar
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, QueryBuilder, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from imgemb_assets.core.lake import maintenance_defaults
from imgemb_assets.core.lake.tables import PARTITION_COLUMN, PARTITION_STORAGE_COLUMN
from imgemb_assets.core.storage.arrow_filesystem import arrow_location
from imgemb_assets.core.storage.objects import local_path_of
from imgemb_assets.core.storage.s3 import (
    S3AccessDenied,
    S3ConfigError,
    access_denied_refusal,
    refuse_credentials_in_uri,
)

# Two writers of the same partition: delta-rs commits one and fails the other
# with CommitFailedError; the loser rewrites on top of the winner's version.
_COMMIT_ATTEMPTS: Final = 6
_COMMIT_RETRY_BASE_S: Final = 0.2
# Bound the writer's memory: parquet row groups of at most this many rows, and
# files of about this size (a 2048-float embedding row is 8 KiB).
MAX_ROW_GROUP_ROWS: Final = 16_384
TARGET_FILE_BYTES: Final = maintenance_defaults.TARGET_FILE_BYTES  # compaction aims at the same size
# A prefix is its own partition value when it is this short and uses only
# characters delta-rs leaves as they are in a folder name; others get a stem and a hash.
_PLAIN_VALUE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_UNPLAIN_RUN: Final = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_CHARS: Final = 32
_HASH_HEX_CHARS: Final = 20  # 80 bits: no two of a billion prefixes share a value, in practice
# The longest folder or file name a local file system takes (ext4, xfs, APFS, NTFS).
_MAX_NAME_BYTES: Final = 255

# Something that can be written more than once: a table, or a function that
# opens a fresh stream of record batches (a retried commit replays it).
Rows: TypeAlias = pa.Table | Callable[[], pa.RecordBatchReader]


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


# Called just before each commit attempt; raises InputChangedError (a retry reads the new input) or
# PartitionRemovedError (the partition is gone) to abandon the write.
Precondition = Callable[[], None]


def all_of(*preconditions: Precondition) -> Precondition:
    def check() -> None:
        for precondition in preconditions:
            precondition()

    return check


def partition_predicate(partition_key: str, column: str = PARTITION_COLUMN) -> str:
    """A Delta predicate matching exactly one value of `column`.

    The key is a SQL string literal with quotes doubled, so no key can close the
    literal and widen the predicate.
    """
    return f"{column} = {sql_string(partition_key)}"


def sql_string(value: str) -> str:
    """A SQL string literal of `value`, quotes doubled: no value can close the literal and widen a predicate."""
    escaped = value.replace("'", "''")
    return f"'{escaped}'"


def partition_value(prefix: str) -> str:
    """The physical partition value of a prefix: stable, at most 64 ASCII characters, a folder name on any file system.

    A short prefix of letters, digits and `._-` is its own value, so the usual
    (date) prefixes keep readable folders and their keys are read from the log
    alone. Any other prefix becomes a readable stem, `~` (in no plain value, so
    the two kinds never meet) and a hash of the whole prefix.
    """
    if _PLAIN_VALUE.fullmatch(prefix):
        return prefix
    folded = unicodedata.normalize("NFKD", prefix).encode("ascii", "ignore").decode()  # café -> cafe
    stem = _UNPLAIN_RUN.sub("_", folded)[:_STEM_CHARS]
    digest = hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX_CHARS]
    return f"{stem}~{digest}"


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
            _require_single_partition(data, partition_key)
        self._ensure_local_parent()
        layout_column = self._layout_column(name)
        if layout_column == PARTITION_COLUMN:
            self._require_folder_fits(name, partition_key)
            value = partition_key
        else:
            value = partition_value(partition_key)

        commit = self._overwrite_where(
            name,
            lambda: _with_storage_column(data, layout_column, value),
            partition_predicate(value, layout_column),
            layout_column,
        )
        _commit_with_retries(commit, f"partition {partition_key!r} of {name}", precondition)

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
                self._require_folder_fits(name, key)
            values, rows = keys, data
        else:
            values = [partition_value(key) for key in keys]
            per_row = [partition_value(key) for key in data.column(PARTITION_COLUMN).to_pylist()]
            rows = data.append_column(
                pa.field(layout_column, pa.string(), nullable=False), pa.array(per_row, pa.string())
            )
        listed = ", ".join(sql_string(value) for value in values)
        commit = self._overwrite_where(name, lambda: rows, f"{layout_column} IN ({listed})", layout_column)
        _commit_with_retries(commit, f"{len(keys)} partitions of {name}")

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
            name, lambda table: _partition_filter(table, partition_key), f"partition {partition_key!r} of {name}"
        )

    @_refusing_denied_access
    def delete_rows_where_in(self, name: str, column: str, values: Sequence[str]) -> int:
        """Remove every row whose `column` holds one of `values`, in one commit; the rows removed (0 without a table)."""
        if not values:
            return 0
        listed = ", ".join(sql_string(value) for value in dict.fromkeys(values))
        return self._delete_where(
            name,
            lambda table: f"{_quote_identifier(column)} IN ({listed})",
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

        _commit_with_retries(commit, what)
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
        layout_column = PARTITION_STORAGE_COLUMN if table is None else _layout_column_of(table)
        if table is not None:
            stored_schema = _without(pa.schema(table.schema().to_arrow()), PARTITION_STORAGE_COLUMN)
            if not _same_columns(stored_schema, schema):
                return self._write_spooled(name, batches, schema, partition_key, precondition)
        if layout_column == PARTITION_COLUMN:
            self._require_folder_fits(name, partition_key)
            value = partition_key
        else:
            value = partition_value(partition_key)
        written = _DataFiles(self, name, layout_column, value, _without(schema, layout_column))
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

            _commit_with_retries(commit, f"partition {partition_key!r} of {name}", precondition)
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
                    _require_single_partition(batch, partition_key)
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
        return frozenset(table.file_uris(file_pruning_predicate=[_partition_filter_tuple(table, partition_key)]))

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
        column = _layout_column_of(table)
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
        selected = ", ".join(_quote_identifier(column) for column in columns)
        where = "" if partition_key is None else f" WHERE {_partition_filter(table, partition_key)}"
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
        return without_view_types(_without(pa.schema(self._open(name).schema().to_arrow()), PARTITION_STORAGE_COLUMN))

    @_refusing_denied_access
    def partition_keys(self, name: str) -> list[str]:
        """The prefixes holding rows: from the table's log, and the `prefix` column of hashed partitions only."""
        try:
            table = self._open(name)
        except LakeError:
            return []
        column = _layout_column_of(table)
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
            return _layout_column_of(self._open(name))
        except LakeError:
            return PARTITION_STORAGE_COLUMN

    def _require_folder_fits(self, name: str, partition_key: str) -> None:
        # delta-rs percent-encodes the value into a folder name, and panics where
        # the file system refuses it: say what to do instead.
        folder = f"{PARTITION_COLUMN}={quote(partition_key, safe='')}"
        if len(folder.encode()) > _MAX_NAME_BYTES:
            raise LakeError(
                f"{name} was created partitioned by {PARTITION_COLUMN!r}, and prefix {partition_key!r} is too long "
                f"for a folder name there ({len(folder.encode())} bytes once encoded, at most {_MAX_NAME_BYTES}); "
                f"migrate the table once with Lake({self.root_uri!r}).migrate_partitioning({name!r}) "
                f"(or `python -m imgemb_assets.core.lake.lake migrate <lake uri> {name}`), then materialize again"
            )

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


def _commit_with_retries(commit: Callable[[], None], what: str, precondition: Precondition | None = None) -> None:
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


def _layout_column_of(table: DeltaTable) -> str:
    columns = table.metadata().partition_columns
    return PARTITION_COLUMN if columns == [PARTITION_COLUMN] else PARTITION_STORAGE_COLUMN


def _partition_filter(table: DeltaTable, partition_key: str) -> str:
    column = _layout_column_of(table)
    if column == PARTITION_COLUMN:
        return partition_predicate(partition_key)
    # the physical value prunes the files; `prefix` makes the answer exact whatever the hash
    return f"{partition_predicate(partition_value(partition_key), column)} AND {partition_predicate(partition_key)}"


def _partition_filter_tuple(table: DeltaTable, partition_key: str) -> tuple[str, str, str]:
    """The partition's physical folder as a delta-rs partition filter (no data file is opened)."""
    column = _layout_column_of(table)
    return (column, "=", partition_key if column == PARTITION_COLUMN else partition_value(partition_key))


def _with_storage_column(data: Rows, column: str, value: str) -> pa.Table | pa.RecordBatchReader:
    """The rows to write, with the physical partition column added when the layout has one."""
    rows = data if isinstance(data, pa.Table) else data()
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


def main(argv: list[str] | None = None) -> int:
    """`python -m imgemb_assets.core.lake.lake migrate <lake uri> [table ...]`: today's partition layout for old tables."""
    import argparse

    from imgemb_assets.core.storage.s3 import S3Settings

    parser = argparse.ArgumentParser(prog="python -m imgemb_assets.core.lake.lake", description=main.__doc__)
    parser.add_argument("command", choices=["migrate"])
    parser.add_argument("lake_uri")
    parser.add_argument("tables", nargs="*", help="default: every partitioned table of the pipeline")
    args = parser.parse_args(argv)
    from imgemb_assets.core.lake import tables

    options = S3Settings().delta_storage_options() if args.lake_uri.startswith("s3://") else None
    lake = Lake(args.lake_uri, storage_options=options)
    names = args.tables or [name for name in tables.ALL_TABLES if name != tables.SALES]
    for name in names:
        if not lake.exists(name):
            print(f"{name}: no table")
        else:
            migrated = lake.migrate_partitioning(name)
            print(f"{name}: {'migrated' if migrated else 'already partitioned by ' + PARTITION_STORAGE_COLUMN}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


class _DataFiles:
    """Parquet data files written by pyarrow into one partition folder of a table, for one transaction."""

    def __init__(self, lake: Lake, name: str, layout_column: str, value: str, file_schema: pa.Schema) -> None:
        self._location = arrow_location(lake.table_uri(name), lake.current_storage_options())
        self._layout_column = layout_column
        self._value = value
        self._file_schema = file_schema
        # delta-rs's own folder naming: the value percent-encoded.
        self._folder = f"{layout_column}={quote(value, safe='')}"
        self.actions: list[AddAction] = []
        self._created: list[str] = []  # every file opened, committed or not

    def write(self, batches: Iterable[pa.RecordBatch], partition_key: str) -> int:
        """Write the batches into files of about TARGET_FILE_BYTES each; the row count."""
        if self._location.is_local:
            self._location.filesystem.create_dir(self._location.file(self._folder), recursive=True)
        rows = file_rows = file_bytes = 0
        writer: pq.ParquetWriter | None = None
        try:
            for batch in batches:
                _require_single_partition(batch, partition_key)
                if writer is None:
                    writer = self._open_file()
                    file_rows = file_bytes = 0
                columns = [batch.column(field_.name) for field_ in self._file_schema]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self._file_schema))
                file_rows += batch.num_rows
                file_bytes += batch.nbytes
                rows += batch.num_rows
                if file_bytes >= TARGET_FILE_BYTES:
                    writer.close()
                    writer = None
                    self._add(self._created[-1], file_rows)
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            self._add(self._created[-1], file_rows)
        return rows

    def _open_file(self) -> pq.ParquetWriter:
        relative = f"{self._folder}/part-imgemb-{uuid.uuid4()}.parquet"
        self._created.append(relative)
        return pq.ParquetWriter(self._location.file(relative), self._file_schema, filesystem=self._location.filesystem)

    def _add(self, relative: str, rows: int) -> None:
        size = self._location.filesystem.get_file_info(self._location.file(relative)).size
        self.actions.append(
            AddAction(
                path=quote(relative, safe="/="),
                size=size,
                partition_values={self._layout_column: self._value},
                modification_time=int(time.time() * 1000),
                data_change=True,
                stats=json.dumps({"numRecords": rows}),
            )
        )

    def delete(self) -> None:
        for relative in self._created:
            try:
                self._location.filesystem.delete_file(self._location.file(relative))
            except OSError:
                pass  # left for vacuum: no version of the table names it


def _without(schema: pa.Schema, column: str) -> pa.Schema:
    index = schema.get_field_index(column)
    return schema if index < 0 else schema.remove(index)


def _same_columns(stored: pa.Schema, written: pa.Schema) -> bool:
    """Whether the stored table has exactly the written columns and types (nullability aside)."""
    return [(f.name, f.type) for f in stored] == [(f.name, f.type) for f in written]
