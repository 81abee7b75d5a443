"""The parquet data files of a table: how big a write makes them (`TARGET_FILE_BYTES`, `MAX_ROW_GROUP_ROWS`), and the
files pyarrow writes straight into one partition folder for a streamed write's single transaction (`DataFiles`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake.transaction import AddAction

from imgemb_assets.core.lake import maintenance_defaults
from imgemb_assets.core.lake.partition_layout import require_single_partition
from imgemb_assets.core.storage.arrow_filesystem import ArrowLocation

# Bound the writer's memory: parquet row groups of at most this many rows, and
# files of about this size (a 2048-float embedding row is 8 KiB).
MAX_ROW_GROUP_ROWS: Final = 16_384
TARGET_FILE_BYTES: Final = maintenance_defaults.TARGET_FILE_BYTES  # compaction aims at the same size


class DataFiles:
    """Parquet data files written by pyarrow into one partition folder of a table, for one transaction."""

    def __init__(self, table: ArrowLocation, layout_column: str, value: str, file_schema: pa.Schema) -> None:
        self._location = table
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
                require_single_partition(batch, partition_key)
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


def without_column(schema: pa.Schema, column: str) -> pa.Schema:
    index = schema.get_field_index(column)
    return schema if index < 0 else schema.remove(index)


def same_columns(stored: pa.Schema, written: pa.Schema) -> bool:
    """Whether the stored table has exactly the written columns and types (nullability aside)."""
    return [(f.name, f.type) for f in stored] == [(f.name, f.type) for f in written]
