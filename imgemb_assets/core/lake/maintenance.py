"""Lake maintenance of one Delta table: compact small files, checkpoint the log, vacuum what no version references.

Steps, in this order:

1. Compaction, one partition at a time, of the partitions holding at least
   `compact_min_files` files smaller than the target size (a partition write
   normally leaves one file; appends and streamed writes leave more). Each
   partition is its own optimize commit (`dataChange=false`: the rows do not
   change), so a conflict costs that partition only. An unpartitioned table is
   compacted as a whole.
2. A checkpoint at the latest version, and `cleanup_metadata` (log files older
   than the table's `delta.logRetentionDuration`, 30 days by default), so that
   opening the table reads one parquet checkpoint instead of replaying every
   JSON commit.
3. A full vacuum: data files that no version within the retention references.
   delta-rs 1.6.6's `full=True` deletes (a) files a `remove` action tombstoned
   longer ago than the retention and (b) files the log never mentions whose
   last modification is older than the retention (data files of killed or lost
   writes). Recent tombstones are kept whatever their file's age (delta-rs
   #4290, fixed in #4300), and the default (lite) mode would miss (b) and
   every tombstone from before the latest checkpoint, which step 2 just wrote.

Files this run's compaction removed are tombstoned now, so they outlive this
vacuum by the whole retention: a reader that opened the previous version goes
on reading it. The retention must also exceed the longest write in flight
(its data files are not in the log until it commits); Lake writes a
partition's files and commits them within one `write_deltalake` call.

Concurrency: delta-rs's optimize reads the whole table, so its commit fails
with CommitFailedError after *any* concurrent non-append write, not only one to
the same partition; a writer that loses to a committed optimize retries on its
side (`Lake.write_partition`). Here a lost partition is re-planned on the new
version once, when its own files are unchanged, and otherwise skipped (a writer
just rewrote it); it is never retried in a loop. A lost compaction leaves the
files it wrote behind, unreferenced: a later vacuum removes them once they are
older than the retention. Serializing with the writers is the caller's job
(the Dagster job refuses to start while other runs are in progress).

A compaction changes the files of a partition, so a writer holding a
`Lake.unchanged_since` precondition on it abandons its write and is retried by
its step: safe, but another reason not to run this next to the writers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Final

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, WriterProperties
from deltalake.exceptions import CommitFailedError, TableNotFoundError

# One definition of the row-group size Lake writes; compaction writes the same.
from imgemb_assets.core.lake.data_files import MAX_ROW_GROUP_ROWS
from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.lake import Lake

# The defaults (the file size compaction aims at among them) live in a deltalake-free module,
# which the location's settings (dagster_wiring/location/settings.py) share.
from imgemb_assets.core.lake.maintenance_defaults import (
    COMPACT_MIN_FILES,
    DELTA_DEFAULT_RETENTION_HOURS,
    TARGET_FILE_BYTES,
)

# Written into this run's vacuum commits, to find their metrics (the bytes deleted) in the history.
_RUN_KEY: Final = "imgemb.maintenance_run"
_HISTORY_SEARCH: Final = 20

# (column, value) of every partition column; () for an unpartitioned table, compacted as a whole.
Partition = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class MaintenanceSettings:
    # Partitions with fewer small files are left as they are: rewriting them would gain little.
    compact_min_files: int = COMPACT_MIN_FILES
    target_file_bytes: int = TARGET_FILE_BYTES
    vacuum_retention_hours: int = DELTA_DEFAULT_RETENTION_HOURS
    # Lets a retention shorter than the table's `delta.deletedFileRetentionDuration` through delta-rs's
    # check; without it such a vacuum fails instead of deleting what a reader may still need.
    allow_short_retention: bool = False

    def __post_init__(self) -> None:
        if self.compact_min_files < 2:
            raise ValueError(f"compact_min_files must be at least 2, got {self.compact_min_files}")
        if self.target_file_bytes < 1:
            raise ValueError(f"target_file_bytes must be positive, got {self.target_file_bytes}")
        # 0 would delete the data files of every write in flight
        if self.vacuum_retention_hours < 1:
            raise ValueError(f"vacuum_retention_hours must be at least 1, got {self.vacuum_retention_hours}")
        if self.vacuum_retention_hours < DELTA_DEFAULT_RETENTION_HOURS and not self.allow_short_retention:
            raise ValueError(
                f"vacuum_retention_hours {self.vacuum_retention_hours} is below Delta's default of "
                f"{DELTA_DEFAULT_RETENTION_HOURS}: a reader or write older than that may lose its files; "
                "set allow_short_retention to mean it"
            )


@dataclass(frozen=True)
class CompactionResult:
    partitions_compacted: tuple[str, ...]
    # lost to a concurrent writer (which had rewritten them, or kept winning)
    partitions_skipped: tuple[str, ...]
    files_removed: int
    files_added: int


@dataclass(frozen=True)
class MaintenanceReport:
    table: str
    version_before: int
    version_after: int
    files_before: int
    files_after: int
    partitions_compacted: int
    partitions_skipped: int
    skipped_partitions: tuple[str, ...]  # the partitions a concurrent writer won, left to the next run
    files_compacted_away: int
    files_compacted_into: int
    files_vacuumed: int
    bytes_vacuumed: int
    vacuumed_paths: tuple[str, ...]
    checkpoint_version: int
    seconds: float


def maintain_table(lake: Lake, name: str, settings: MaintenanceSettings | None = None) -> MaintenanceReport:
    """Compact, checkpoint and vacuum one existing table of the lake (see the module docstring); what it did."""
    settings = settings or MaintenanceSettings()
    started = time.monotonic()
    table = _open(lake, name)
    version_before, files_before = table.version(), _file_count(table)
    compaction = compact_partitions(table, settings)

    # Reopened with current storage options: credentials may have expired during a long compaction.
    table = _open(lake, name)
    table.create_checkpoint()
    checkpoint_version = table.version()
    table.cleanup_metadata()

    vacuumed, bytes_vacuumed = _vacuum(table, settings)
    table.update_incremental()
    return MaintenanceReport(
        table=name,
        version_before=version_before,
        version_after=table.version(),
        files_before=files_before,
        files_after=_file_count(table),
        partitions_compacted=len(compaction.partitions_compacted),
        partitions_skipped=len(compaction.partitions_skipped),
        skipped_partitions=compaction.partitions_skipped,
        files_compacted_away=compaction.files_removed,
        files_compacted_into=compaction.files_added,
        files_vacuumed=len(vacuumed),
        bytes_vacuumed=bytes_vacuumed,
        vacuumed_paths=tuple(sorted(vacuumed)),
        checkpoint_version=checkpoint_version,
        seconds=time.monotonic() - started,
    )


def compact_partitions(table: DeltaTable, settings: MaintenanceSettings) -> CompactionResult:
    """Compact each partition `table`'s current version shows with enough small files, one commit each.

    `table` moves to the latest version as it goes.
    """
    compacted: list[str] = []
    skipped: list[str] = []
    removed = added = 0
    for partition in partitions_to_compact(table, settings):
        metrics = _compact_partition(table, partition, settings)
        if metrics is None:
            skipped.append(_describe(partition))
        elif metrics["numFilesRemoved"] > 0:
            compacted.append(_describe(partition))
            removed += metrics["numFilesRemoved"]
            added += metrics["numFilesAdded"]
    return CompactionResult(tuple(compacted), tuple(skipped), removed, added)


def partitions_to_compact(table: DeltaTable, settings: MaintenanceSettings) -> list[Partition]:
    """The partitions holding at least `compact_min_files` files smaller than the target, in value order."""
    actions = pa.RecordBatchReader.from_stream(table.get_add_actions(flatten=True)).read_all()
    columns = table.metadata().partition_columns
    sizes = actions.column("size_bytes").to_pylist()
    values = [actions.column(f"partition.{column}").to_pylist() for column in columns]
    small: dict[Partition, int] = {}
    for row, size in enumerate(sizes):
        # files at the target already are what a compaction would write
        if size < settings.target_file_bytes:
            partition = tuple((column, str(values[i][row])) for i, column in enumerate(columns))
            small[partition] = small.get(partition, 0) + 1
    return sorted(partition for partition, count in small.items() if count >= settings.compact_min_files)


def _compact_partition(table: DeltaTable, partition: Partition, settings: MaintenanceSettings) -> dict | None:
    """The optimize metrics, or None where a concurrent writer won."""
    filters = [(column, "=", value) for column, value in partition] or None
    files = _files(table, filters)
    for attempt in (1, 2):
        try:
            return table.optimize.compact(
                partition_filters=filters,
                target_size=settings.target_file_bytes,
                writer_properties=WriterProperties(max_row_group_size=MAX_ROW_GROUP_ROWS),
            )
        except CommitFailedError:
            # Without this, every later partition would be planned on the stale version and lose too.
            table.update_incremental()
            # Rewritten by a writer: its new files need no compaction now. Unchanged: the winner wrote
            # another partition (optimize reads the whole table), so one more try on the new version.
            if attempt == 2 or _files(table, filters) != files:
                return None
    return None


def _vacuum(table: DeltaTable, settings: MaintenanceSettings) -> tuple[list[str], int]:
    """The paths the vacuum deleted (relative to the table) and their bytes."""
    run = uuid.uuid4().hex
    deleted = table.vacuum(
        retention_hours=settings.vacuum_retention_hours,
        dry_run=False,
        enforce_retention_duration=not settings.allow_short_retention,
        full=True,
        commit_properties=CommitProperties(custom_metadata={_RUN_KEY: run}),
    )
    if not deleted:
        return [], 0  # delta-rs commits nothing then
    # The sizes are in the VACUUM START commit's metrics only (delta-rs returns the paths); past
    # the history searched (many concurrent commits meanwhile) they are reported as 0.
    for commit in table.history(_HISTORY_SEARCH):
        if commit.get(_RUN_KEY) == run and commit.get("operation") == "VACUUM START":
            return list(deleted), int(commit.get("operationMetrics", {}).get("sizeOfDataToDelete", 0))
    return list(deleted), 0


def _open(lake: Lake, name: str) -> DeltaTable:
    try:
        return DeltaTable(lake.table_uri(name), storage_options=lake.current_storage_options())
    except TableNotFoundError as exc:
        raise LakeError(f"Delta table {lake.table_uri(name)} does not exist; nothing to maintain") from exc


def _files(table: DeltaTable, filters: list[tuple[str, str, str]] | None) -> frozenset[str]:
    return frozenset(table.file_uris(file_pruning_predicate=filters))


def _file_count(table: DeltaTable) -> int:
    return len(table.file_uris())


def _describe(partition: Partition) -> str:
    return ", ".join(f"{column}={value}" for column, value in partition) or "(whole table)"
