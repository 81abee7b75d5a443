"""Lake maintenance on real Delta tables: compaction of many-file partitions, orphans of a killed write vacuumed,
a reader of the previous version unharmed, and compactions that lose to a concurrent writer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, QueryBuilder, write_deltalake

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.maintenance import MaintenanceSettings, compact_partitions, maintain_table
from imgemb_assets.core.lake.tables import (
    PARTITION_STORAGE_COLUMN,
    REJECTED_IMAGES,
    SALES,
)
from imgemb_support.rows import rejected_rows

MANY = "2026-11-01"  # plain prefixes: each is its own partition value
FEW = "2026-11-02"
OTHER = "2026-11-03"
TWO_DAYS_AGO = time.time() - 2 * 86_400
# A short retention, explicitly allowed: the aged files are past it, everything written by the test is not.
SHORT = MaintenanceSettings(compact_min_files=4, vacuum_retention_hours=1, allow_short_retention=True)


def _rows(prefix: str, ids: range) -> pa.Table:
    return rejected_rows(prefix, [f"{prefix}-{i}" for i in ids])


def _append(lake: Lake, prefix: str, ids: range) -> None:
    """What an appending writer leaves: one more small file in the partition (Lake itself only replaces)."""
    rows = _rows(prefix, ids)
    column = pa.field(PARTITION_STORAGE_COLUMN, pa.string(), nullable=False)
    rows = rows.append_column(column, pa.array([prefix] * rows.num_rows))
    write_deltalake(lake.table_uri(REJECTED_IMAGES), rows, mode="append", partition_by=[PARTITION_STORAGE_COLUMN])


def _partition_with_files(lake: Lake, prefix: str, files: int) -> None:
    lake.write_partition(REJECTED_IMAGES, _rows(prefix, range(0, 2)), prefix)
    for n in range(1, files):
        _append(lake, prefix, range(2 * n, 2 * n + 2))


def _folder(lake: Lake, prefix: str) -> Path:
    return Path(lake.table_uri(REJECTED_IMAGES)) / f"{PARTITION_STORAGE_COLUMN}={prefix}"


def _age(paths: set[Path]) -> None:
    for path in paths:
        os.utime(path, (TWO_DAYS_AGO, TWO_DAYS_AGO))


def _sorted_rows(table: pa.Table) -> list[dict]:
    columns = [name for name in table.column_names if name != PARTITION_STORAGE_COLUMN]
    return sorted(table.select(columns).to_pylist(), key=lambda row: row["image_id"])


# Appends to the table a stream that delta-rs flushes into several files, then hangs before committing.
_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
import pyarrow as pa
from deltalake import write_deltalake
from imgemb_assets.core.lake.tables import PARTITION_STORAGE_COLUMN, REJECTED_IMAGES_SCHEMA

uri, prefix, halfway = sys.argv[1], sys.argv[2], Path(sys.argv[3])
schema = REJECTED_IMAGES_SCHEMA.append(pa.field(PARTITION_STORAGE_COLUMN, pa.string(), nullable=False))

def batches():
    for b in range(1000):
        ids = [f"killed-{b}-{i}" for i in range(2000)]
        n = len(ids)
        reasons = [os.urandom(50).hex() for _ in ids]  # incompressible: files fill up
        yield pa.record_batch([ids, [prefix] * n, ids, reasons, [None] * n, [None] * n, [prefix] * n], schema=schema)
        if b == 12:
            halfway.touch()
            time.sleep(600)

write_deltalake(uri, pa.RecordBatchReader.from_batches(schema, batches()), mode="append",
                partition_by=[PARTITION_STORAGE_COLUMN], target_file_size=256 << 10)
"""


def _killed_write(lake: Lake, prefix: str, marker: Path) -> set[Path]:
    """SIGKILLs a real write to the partition after delta-rs flushed data files and before it committed them."""
    before = set(_folder(lake, prefix).iterdir())
    version = DeltaTable(lake.table_uri(REJECTED_IMAGES)).version()
    uri = lake.table_uri(REJECTED_IMAGES)
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, uri, prefix, str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and len(set(_folder(lake, prefix).iterdir()) - before) >= 2):
            assert writer.poll() is None, "the writer exited before flushing its files"
            assert time.monotonic() < deadline, "the writer flushed no files"
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    assert DeltaTable(lake.table_uri(REJECTED_IMAGES)).version() == version  # nothing of it was committed
    return set(_folder(lake, prefix).iterdir()) - before


def test_maintenance_compacts_vacuums_orphans_and_spares_a_reader_of_the_previous_version(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _partition_with_files(lake, MANY, 7)
    _partition_with_files(lake, FEW, 2)
    small_files = set(_folder(lake, MANY).iterdir())
    # long-lived files: a recent tombstone must be kept whatever its file's age (delta-rs #4290)
    _age(small_files | set(_folder(lake, FEW).iterdir()))
    orphans = _killed_write(lake, MANY, tmp_path / "halfway")
    in_flight = max(orphans)  # stands for a write still running: young, kept
    aged_orphans = orphans - {in_flight}
    _age(aged_orphans)
    orphan_bytes = sum(path.stat().st_size for path in aged_orphans)
    few_files = lake.partition_files(REJECTED_IMAGES, FEW)
    rows = _sorted_rows(lake.read(REJECTED_IMAGES))

    old_reader = DeltaTable(lake.table_uri(REJECTED_IMAGES))
    old_version = old_reader.version()
    report = maintain_table(lake, REJECTED_IMAGES, SHORT)

    assert _sorted_rows(lake.read(REJECTED_IMAGES)) == rows
    assert (report.files_before, report.files_after) == (9, 3)
    assert len(DeltaTable(lake.table_uri(REJECTED_IMAGES)).file_uris()) == 3
    assert (report.partitions_compacted, report.partitions_skipped) == (1, 0)
    assert (report.files_compacted_away, report.files_compacted_into) == (7, 1)
    assert lake.partition_files(REJECTED_IMAGES, FEW) == few_files  # below the threshold: untouched
    # the orphans past the retention are gone, and nothing else was vacuumed
    assert not any(path.exists() for path in aged_orphans)
    assert in_flight.exists()
    table_root = Path(lake.table_uri(REJECTED_IMAGES))
    assert set(report.vacuumed_paths) == {path.relative_to(table_root).as_posix() for path in aged_orphans}
    assert report.files_vacuumed == len(aged_orphans) >= 1
    assert report.bytes_vacuumed == orphan_bytes
    # the compacted-away files were tombstoned just now: kept for the retention, so the old reader reads them
    assert all(path.exists() for path in small_files)
    assert _sorted_rows(old_reader.to_pyarrow_table()) == rows
    engine = QueryBuilder().register("t", old_reader)
    assert _sorted_rows(pa.RecordBatchReader.from_stream(engine.execute("SELECT * FROM t")).read_all()) == rows
    assert _sorted_rows(DeltaTable(lake.table_uri(REJECTED_IMAGES), version=old_version).to_pyarrow_table()) == rows
    # one optimize commit, then the vacuum's start and end commits; the checkpoint is of the compacted version
    assert (report.version_before, report.checkpoint_version, report.version_after) == (
        old_version,
        old_version + 1,
        old_version + 3,
    )
    assert (table_root / "_delta_log" / f"{report.checkpoint_version:020d}.checkpoint.parquet").exists()


def test_partitions_below_the_threshold_are_left_alone_and_nothing_young_is_vacuumed(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _partition_with_files(lake, MANY, 3)
    _partition_with_files(lake, FEW, 1)
    lake.write_partition(REJECTED_IMAGES, _rows(FEW, range(10, 12)), FEW)  # a replaced file: a recent tombstone
    files = {prefix: lake.partition_files(REJECTED_IMAGES, prefix) for prefix in (MANY, FEW)}
    on_disk = set(Path(lake.table_uri(REJECTED_IMAGES)).rglob("*.parquet"))

    report = maintain_table(lake, REJECTED_IMAGES, SHORT)

    assert {prefix: lake.partition_files(REJECTED_IMAGES, prefix) for prefix in (MANY, FEW)} == files
    assert (report.partitions_compacted, report.files_compacted_away, report.files_vacuumed) == (0, 0, 0)
    assert report.version_after == report.version_before == report.checkpoint_version  # no commit at all
    assert set(Path(lake.table_uri(REJECTED_IMAGES)).rglob("*.parquet")) >= on_disk


def test_files_at_the_target_size_do_not_count_as_small(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _partition_with_files(lake, MANY, 5)
    files = lake.partition_files(REJECTED_IMAGES, MANY)
    report = maintain_table(lake, REJECTED_IMAGES, MaintenanceSettings(target_file_bytes=100))
    assert report.partitions_compacted == 0
    assert lake.partition_files(REJECTED_IMAGES, MANY) == files


def test_an_unpartitioned_table_is_compacted_as_a_whole(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    sales = pa.table({"image_id": ["a"], "sales": [1.0]})
    lake.overwrite(SALES, sales)
    for n in range(4):
        more = pa.table({"image_id": [f"x{n}"], "sales": [float(n)]})
        write_deltalake(lake.table_uri(SALES), more, mode="append")
        sales = pa.concat_tables([sales, more])

    report = maintain_table(lake, SALES, SHORT)

    assert (report.partitions_compacted, report.files_before, report.files_after) == (1, 5, 1)
    assert _sorted_rows(lake.read(SALES)) == _sorted_rows(sales)


def test_a_partition_a_writer_rewrote_meanwhile_is_skipped_and_the_others_still_compact(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _partition_with_files(lake, MANY, 4)
    _partition_with_files(lake, OTHER, 4)
    other_rows = _sorted_rows(lake.read(REJECTED_IMAGES, OTHER))
    planned = DeltaTable(lake.table_uri(REJECTED_IMAGES))  # the compaction plans on this version...
    lake.write_partition(REJECTED_IMAGES, _rows(MANY, range(100, 103)), MANY)  # ...and a writer commits after it

    result = compact_partitions(planned, SHORT)

    assert result.partitions_skipped == (f"{PARTITION_STORAGE_COLUMN}={MANY}",)
    assert result.partitions_compacted == (f"{PARTITION_STORAGE_COLUMN}={OTHER}",)
    assert (result.files_removed, result.files_added) == (4, 1)
    # the writer's rows won; the other partition holds the same rows in one file
    written = [f"{MANY}-{i}" for i in range(100, 103)]
    assert [row["image_id"] for row in _sorted_rows(lake.read(REJECTED_IMAGES, MANY))] == written
    assert _sorted_rows(lake.read(REJECTED_IMAGES, OTHER)) == other_rows
    assert len(lake.partition_files(REJECTED_IMAGES, OTHER)) == 1


def test_a_partition_that_lost_to_a_write_elsewhere_is_compacted_on_the_new_version(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _partition_with_files(lake, MANY, 4)
    _partition_with_files(lake, OTHER, 4)
    rows = _sorted_rows(lake.read(REJECTED_IMAGES, MANY))
    planned = DeltaTable(lake.table_uri(REJECTED_IMAGES))
    # delta-rs's optimize reads the whole table: this write of another partition fails the first compaction's commit
    lake.write_partition(REJECTED_IMAGES, _rows(OTHER, range(100, 103)), OTHER)

    result = compact_partitions(planned, SHORT)

    assert result.partitions_compacted == (f"{PARTITION_STORAGE_COLUMN}={MANY}",)
    assert result.partitions_skipped == ()  # OTHER holds one file now: nothing to do there
    assert _sorted_rows(lake.read(REJECTED_IMAGES, MANY)) == rows
    assert len(lake.partition_files(REJECTED_IMAGES, MANY)) == 1
    assert len(lake.partition_files(REJECTED_IMAGES, OTHER)) == 1


def test_a_retention_below_deltas_default_must_be_asked_for() -> None:
    with pytest.raises(ValueError, match="allow_short_retention"):
        MaintenanceSettings(vacuum_retention_hours=24)
    assert MaintenanceSettings(vacuum_retention_hours=24, allow_short_retention=True).vacuum_retention_hours == 24


def test_a_table_in_the_old_layout_partitioned_by_prefix_compacts_too(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    hostile = "it's a/b %x"  # a quote, a slash and a percent sign in the folder name delta-rs encodes
    for prefix in (hostile, MANY):
        for n in range(4):
            rows = _rows(prefix, range(n, n + 1))
            write_deltalake(lake.table_uri(REJECTED_IMAGES), rows, mode="append", partition_by=["prefix"])
    rows = _sorted_rows(lake.read(REJECTED_IMAGES))

    report = maintain_table(lake, REJECTED_IMAGES, SHORT)

    assert (report.partitions_compacted, report.files_before, report.files_after) == (2, 8, 2)
    assert _sorted_rows(lake.read(REJECTED_IMAGES)) == rows
    assert lake.partition_keys(REJECTED_IMAGES) == sorted([hostile, MANY])
