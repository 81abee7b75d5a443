"""Delta writes: replacing one partition leaves the others untouched, a key cannot widen the predicate, any prefix S3
accepts is a partition, and tables created partitioned by `prefix` keep working until migrated."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from imgemb_assets.core.lake.errors import InputChangedError, LakeError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.partition_values import partition_predicate, partition_value
from imgemb_assets.core.lake.tables import PARTITION_STORAGE_COLUMN, REJECTED_IMAGES, REJECTED_IMAGES_SCHEMA
from imgemb_support.rows import rejected_rows


def _ids_by_prefix(lake: Lake) -> dict[str, list[str]]:
    table = lake.read(REJECTED_IMAGES).to_pylist()
    out: dict[str, list[str]] = {}
    for row in table:
        out.setdefault(row["prefix"], []).append(row["image_id"])
    return {prefix: sorted(ids) for prefix, ids in out.items()}


def test_writing_one_partition_leaves_the_others_untouched(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", ["1", "2"]), "a")
    lake.write_partition(REJECTED_IMAGES, rejected_rows("b", ["3"]), "b")
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", ["4"]), "a")
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", ["4"]), "a")  # a rerun replaces, never appends
    assert _ids_by_prefix(lake) == {"a": ["4"], "b": ["3"]}
    assert DeltaTable(lake.table_uri(REJECTED_IMAGES)).version() == 3  # one commit per write


def test_an_empty_write_empties_only_its_partition(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", ["1"]), "a")
    lake.write_partition(REJECTED_IMAGES, rejected_rows("b", ["2"]), "b")
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", []), "a")
    assert _ids_by_prefix(lake) == {"b": ["2"]}
    assert lake.read(REJECTED_IMAGES, "a").num_rows == 0


@pytest.mark.parametrize("hostile", ["x' OR '1'='1", "it's", "a' OR prefix <> 'zz", "100% off + tax=0"])
def test_a_quoted_key_cannot_widen_the_predicate(tmp_path: Path, hostile: str) -> None:
    lake = Lake(str(tmp_path))
    lake.write_partition(REJECTED_IMAGES, rejected_rows("keep", ["1"]), "keep")
    lake.write_partition(REJECTED_IMAGES, rejected_rows(hostile, ["2"]), hostile)
    lake.write_partition(REJECTED_IMAGES, rejected_rows(hostile, ["3"]), hostile)
    assert _ids_by_prefix(lake) == {"keep": ["1"], hostile: ["3"]}
    assert lake.read(REJECTED_IMAGES, hostile).column("image_id").to_pylist() == ["3"]


def test_a_partition_with_a_new_column_merges_into_the_schema(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.write_partition("joined", pa.table({"image_id": ["1"], "prefix": ["a"]}), "a")
    lake.write_partition("joined", pa.table({"image_id": ["2"], "prefix": ["b"], "region": ["eu"]}), "b")
    rows = sorted(lake.read("joined").to_pylist(), key=lambda row: row["image_id"])
    assert rows == [
        {"image_id": "1", "prefix": "a", "region": None},
        {"image_id": "2", "prefix": "b", "region": "eu"},
    ]


def test_predicate_doubles_quotes() -> None:
    assert partition_predicate("it's") == "prefix = 'it''s'"


def test_rows_of_another_partition_are_refused(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    with pytest.raises(LakeError, match="carry prefix values"):
        lake.write_partition(REJECTED_IMAGES, rejected_rows("b", ["1"]), "a")
    assert not lake.exists(REJECTED_IMAGES)


def test_overwrite_replaces_a_whole_table_and_its_schema(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.overwrite("sales", pa.table({"image_id": ["a", "b"], "sales": [1.0, 2.0]}))
    lake.overwrite("sales", pa.table({"image_id": ["c"], "sales": [3.0], "region": ["eu"]}))
    assert lake.read("sales").to_pylist() == [{"image_id": "c", "sales": 3.0, "region": "eu"}]


def test_reading_a_missing_table_names_the_asset_to_materialize(tmp_path: Path) -> None:
    with pytest.raises(LakeError, match="materialize sales first"):
        Lake(str(tmp_path)).read("sales")


_READ_THEN_EXIT = """
import sys
import time
import pyarrow as pa
from imgemb_assets.core.lake.lake import Lake
lake = Lake(sys.argv[1])
for attempt in range(10):
    lake.write_partition("t", pa.table({"prefix": ["p"], "x": [attempt]}), "p")
    assert lake.read("t", "p").column("x").to_pylist() == [attempt]
"""


def test_a_process_that_read_tables_exits_cleanly(tmp_path: Path) -> None:
    # Reading through a pyarrow dataset over delta-rs aborted processes at exit
    # (often, not always), which fails Dagster steps and CLI runs after their work.
    for run in range(3):
        done = subprocess.run(
            [sys.executable, "-c", _READ_THEN_EXIT, str(tmp_path / f"lake{run}")], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]


def _write_same_partition(root: str, tag: str, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    Lake(root).write_partition(REJECTED_IMAGES, rejected_rows("p", [f"{tag}{i}" for i in range(40)]), "p")


def test_concurrent_writers_of_one_partition_leave_exactly_one_copy(tmp_path: Path) -> None:
    root = str(tmp_path)
    Lake(root).write_partition(REJECTED_IMAGES, rejected_rows("p", ["seed"]), "p")
    context = multiprocessing.get_context("spawn")  # deltalake must not run in a forked child
    for _round in range(3):
        barrier = context.Barrier(2)
        writers = [context.Process(target=_write_same_partition, args=(root, tag, barrier)) for tag in ("a", "b")]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=120)
        # the loser of the commit race retried on top of the winner: both succeed
        assert [writer.exitcode for writer in writers] == [0, 0]
        ids = Lake(root).read(REJECTED_IMAGES, "p").column("image_id").to_pylist()
        assert len(ids) == 40 and len({image_id[0] for image_id in ids}) == 1, "one writer's rows, once"


# A writer replacing partition "a" of a local table with a stream that stops halfway (and is killed there).
_STREAMING_WRITER = """
import sys, time
from pathlib import Path
import pyarrow as pa
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import REJECTED_IMAGES, REJECTED_IMAGES_SCHEMA

root, halfway = sys.argv[1], Path(sys.argv[2])

def batches():
    for start in range(0, 40_000, 1_000):
        ids = [str(i) for i in range(start, start + 1_000)]
        yield pa.record_batch(
            [ids, ["a"] * len(ids), [f"a/{i}.jpg" for i in ids], ["replaced"] * len(ids), [None] * len(ids), [None] * len(ids)],
            schema=REJECTED_IMAGES_SCHEMA,
        )
        if start == 20_000:
            halfway.touch()
            time.sleep(600)

Lake(root).write_partition(REJECTED_IMAGES, lambda: pa.RecordBatchReader.from_batches(REJECTED_IMAGES_SCHEMA, batches()), "a")
"""


def test_a_writer_killed_mid_stream_leaves_the_previous_version(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", ["1", "2"]), "a")
    lake.write_partition(REJECTED_IMAGES, rejected_rows("b", ["3"]), "b")
    version = DeltaTable(lake.table_uri(REJECTED_IMAGES)).version()
    halfway = tmp_path / "halfway"
    writer = subprocess.Popen([sys.executable, "-c", _STREAMING_WRITER, lake.root_uri, str(halfway)])
    try:
        while not halfway.exists():
            assert writer.poll() is None, "the writer exited before reaching halfway"
            time.sleep(0.05)
    finally:
        writer.kill()  # SIGKILL
        writer.wait()
    assert DeltaTable(lake.table_uri(REJECTED_IMAGES)).version() == version
    assert _ids_by_prefix(lake) == {"a": ["1", "2"], "b": ["3"]}
    assert lake.read(REJECTED_IMAGES).column("reason").unique().to_pylist() == ["r"]


LONG_CYRILLIC = "ж" * 51  # 102 bytes of UTF-8, 306 once percent-encoded: too long for a folder name


@pytest.mark.parametrize("prefix", [LONG_CYRILLIC, "é" * 500, "x" * 1000, " lead", "trail ", 'say "hi"', "a\x01b"])
def test_any_prefix_s3_accepts_is_a_partition(tmp_path: Path, prefix: str) -> None:
    lake = Lake(str(tmp_path))
    lake.write_partition(REJECTED_IMAGES, rejected_rows("keep", ["1"]), "keep")
    lake.write_partition(REJECTED_IMAGES, rejected_rows(prefix, ["2"]), prefix)
    lake.write_partition(REJECTED_IMAGES, rejected_rows(prefix, ["3", "4"]), prefix)
    assert _ids_by_prefix(lake) == {"keep": ["1"], prefix: ["3", "4"]}
    assert lake.read(REJECTED_IMAGES, prefix).schema == REJECTED_IMAGES_SCHEMA  # the physical column stays inside Lake
    assert lake.partition_keys(REJECTED_IMAGES) == sorted(["keep", prefix])


def test_partition_values_are_short_stable_and_distinct() -> None:
    assert partition_value("2026-11-01") == "2026-11-01"  # readable folders for the usual prefixes
    assert partition_value("café ☕").startswith("cafe_~")
    prefixes = ["a b", "a_b", "a~b", "A b", LONG_CYRILLIC, LONG_CYRILLIC + "ж", "x" * 64, "x" * 65, "", "'"]
    values = [partition_value(prefix) for prefix in prefixes]
    assert len(set(values)) == len(values)
    assert all(len(value) <= 64 and value.isascii() and "'" not in value for value in values)
    assert values == [partition_value(prefix) for prefix in prefixes]


def test_a_table_created_partitioned_by_prefix_keeps_its_layout_until_migrated(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    write_deltalake(lake.table_uri(REJECTED_IMAGES), rejected_rows("a", ["1"]), partition_by=["prefix"])  # as before
    lake.write_partition(REJECTED_IMAGES, rejected_rows("b", ["2"]), "b")
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", ["3"]), "a")
    assert DeltaTable(lake.table_uri(REJECTED_IMAGES)).metadata().partition_columns == ["prefix"]
    assert _ids_by_prefix(lake) == {"a": ["3"], "b": ["2"]}
    assert lake.partition_keys(REJECTED_IMAGES) == ["a", "b"]
    with pytest.raises(
        LakeError, match=r"too long for a folder name there .*\.migrate_partitioning\('rejected_images'\)"
    ):
        lake.write_partition(REJECTED_IMAGES, rejected_rows(LONG_CYRILLIC, ["4"]), LONG_CYRILLIC)
    assert lake.migrate_partitioning(REJECTED_IMAGES) is True
    assert lake.migrate_partitioning(REJECTED_IMAGES) is False
    assert DeltaTable(lake.table_uri(REJECTED_IMAGES)).metadata().partition_columns == [PARTITION_STORAGE_COLUMN]
    lake.write_partition(REJECTED_IMAGES, rejected_rows(LONG_CYRILLIC, ["4"]), LONG_CYRILLIC)
    assert _ids_by_prefix(lake) == {"a": ["3"], "b": ["2"], LONG_CYRILLIC: ["4"]}


def test_an_empty_prefix_is_no_partition(tmp_path: Path) -> None:
    with pytest.raises(LakeError, match="empty prefix"):
        Lake(str(tmp_path)).write_partition(REJECTED_IMAGES, rejected_rows("", ["1"]), "")


def test_polars_reads_any_partition_by_its_prefix(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    for prefix in ("2026-11-01", LONG_CYRILLIC):
        lake.write_partition(REJECTED_IMAGES, rejected_rows(prefix, [prefix[:3]]), prefix)
    frame = pl.scan_delta(lake.table_uri(REJECTED_IMAGES)).filter(pl.col("prefix") == LONG_CYRILLIC).collect()
    assert frame["image_id"].to_list() == ["жжж"]


def test_a_write_whose_input_partition_was_rewritten_meanwhile_commits_nothing(tmp_path: Path) -> None:
    """Two runs computing the same partition from different versions of its input: the one that read the
    older input never commits over the newer result, whichever finishes last."""
    lake = Lake(str(tmp_path / "lake"))

    def source(value: int, prefix: str = "p") -> pa.Table:
        return pa.table({"prefix": [prefix, prefix], "v": [value, value + 1]})

    lake.write_partition("source", source(1), "p")
    lake.write_partition("source", source(10, "q"), "q")
    unchanged = lake.unchanged_since("source", "p")
    lake.write_partition("derived", source(100), "p", precondition=unchanged)  # input as read: committed
    lake.write_partition("source", source(5, "q"), "q")  # another partition: not this write's input
    lake.write_partition("derived", source(200), "p", precondition=unchanged)
    assert lake.read("derived", "p")["v"].to_pylist() == [200, 201]

    lake.write_partition("source", source(2), "p")  # the input is rewritten after it was read
    with pytest.raises(InputChangedError, match="rewritten while it was being read"):
        lake.write_partition("derived", source(300), "p", precondition=unchanged)
    with pytest.raises(InputChangedError):
        lake.write_partition_stream(
            "derived", iter(source(300).to_batches()), source(300).schema, "p", precondition=unchanged
        )
    assert lake.read("derived", "p")["v"].to_pylist() == [200, 201]
    assert lake.partition_files("missing", "p") == frozenset()


@pytest.mark.parametrize("layout", ["today", "by prefix"])
def test_deleting_a_partition_removes_its_rows_and_nothing_else(tmp_path: Path, layout: str) -> None:
    lake = Lake(str(tmp_path))
    if layout == "by prefix":
        write_deltalake(lake.table_uri(REJECTED_IMAGES), rejected_rows("a", ["0"]), partition_by=["prefix"])
    for prefix, ids in (("a", ["1", "2"]), ("b", ["3"]), (LONG_CYRILLIC if layout == "today" else "c", ["4"])):
        lake.write_partition(REJECTED_IMAGES, rejected_rows(prefix, ids), prefix)
    before = DeltaTable(lake.table_uri(REJECTED_IMAGES))
    kept = {prefix: ids for prefix, ids in _ids_by_prefix(lake).items() if prefix != "a"}

    assert lake.delete_partition(REJECTED_IMAGES, "a") == 2
    assert _ids_by_prefix(lake) == kept
    assert "a" not in lake.partition_keys(REJECTED_IMAGES)
    assert lake.delete_partition(REJECTED_IMAGES, "a") == 0  # again: nothing left, nothing else touched
    assert _ids_by_prefix(lake) == kept
    assert sorted(before.to_pyarrow_table().column("image_id").to_pylist()) == ["1", "2", "3", "4"]  # an older reader
    assert lake.delete_partition("no_such_table", "a") == 0


@pytest.mark.parametrize("layout", ["today", "by prefix"])
def test_a_partition_fingerprint_changes_exactly_when_the_partition_is_rewritten(tmp_path: Path, layout: str) -> None:
    lake = Lake(str(tmp_path))
    assert lake.partition_fingerprints(REJECTED_IMAGES) == {}  # no table yet
    if layout == "by prefix":
        write_deltalake(lake.table_uri(REJECTED_IMAGES), rejected_rows("a", ["0"]), partition_by=["prefix"])
    other = LONG_CYRILLIC if layout == "today" else "c"
    for prefix in ("a", "b", other):
        lake.write_partition(REJECTED_IMAGES, rejected_rows(prefix, ["1"]), prefix)
    before = lake.partition_fingerprints(REJECTED_IMAGES)
    assert sorted(before) == sorted(["a", "b", other])
    lake.write_partition(REJECTED_IMAGES, rejected_rows("b", ["1"]), "b")  # the same rows, written again
    after = lake.partition_fingerprints(REJECTED_IMAGES)
    assert after["b"] != before["b"]
    assert {k: v for k, v in after.items() if k != "b"} == {k: v for k, v in before.items() if k != "b"}
    lake.delete_partition(REJECTED_IMAGES, "a")
    assert sorted(lake.partition_fingerprints(REJECTED_IMAGES)) == sorted(["b", other])


@pytest.mark.parametrize("layout", ["today", "by prefix"])
def test_replacing_several_partitions_is_one_commit_and_leaves_the_others(tmp_path: Path, layout: str) -> None:
    lake = Lake(str(tmp_path))
    if layout == "by prefix":
        write_deltalake(lake.table_uri(REJECTED_IMAGES), rejected_rows("a", ["0"]), partition_by=["prefix"])
    for prefix in ("a", "b", "c"):
        lake.write_partition(REJECTED_IMAGES, rejected_rows(prefix, ["old"]), prefix)
    version = DeltaTable(lake.table_uri(REJECTED_IMAGES)).version()
    # "b" gets new rows, "c" none, "d" is new; "a" is not named and keeps its rows
    lake.replace_partitions(REJECTED_IMAGES, pa.concat_tables([rejected_rows("b", ["1", "2"]), rejected_rows("d", ["3"])]),
                            ["b", "c", "d"])  # fmt: skip
    assert _ids_by_prefix(lake) == {"a": ["old"], "b": ["1", "2"], "d": ["3"]}
    assert DeltaTable(lake.table_uri(REJECTED_IMAGES)).version() == version + 1
    with pytest.raises(LakeError, match="not among those replaced"):
        lake.replace_partitions(REJECTED_IMAGES, rejected_rows("a", ["4"]), ["b"])
    assert _ids_by_prefix(lake) == {"a": ["old"], "b": ["1", "2"], "d": ["3"]}


def _batches(table: pa.Table, rows_per_batch: int = 2) -> list[pa.RecordBatch]:
    return table.to_batches(max_chunksize=rows_per_batch)


@pytest.mark.parametrize("layout", ["today", "by prefix"])
def test_a_streamed_write_replaces_its_partition_alone_in_one_commit(tmp_path: Path, layout: str) -> None:
    lake = Lake(str(tmp_path))
    if layout == "by prefix":
        write_deltalake(lake.table_uri(REJECTED_IMAGES), rejected_rows("a", ["0"]), partition_by=["prefix"])
    odd = "ä b%c=d" if layout == "today" else "plain-c"  # percent-encoded in the file's folder
    for prefix, ids in (("a", ["1", "2"]), ("b", ["3"]), (odd, ["4"])):
        lake.write_partition(REJECTED_IMAGES, rejected_rows(prefix, ids), prefix)
    version = DeltaTable(lake.table_uri(REJECTED_IMAGES)).version()

    assert (
        lake.write_partition_stream(
            REJECTED_IMAGES, _batches(rejected_rows("a", ["5", "6", "7"])), REJECTED_IMAGES_SCHEMA, "a"
        )
        == 3
    )
    assert (
        lake.write_partition_stream(REJECTED_IMAGES, _batches(rejected_rows(odd, ["8"])), REJECTED_IMAGES_SCHEMA, odd)
        == 1
    )
    assert _ids_by_prefix(lake) == {"a": ["5", "6", "7"], "b": ["3"], odd: ["8"]}
    table = DeltaTable(lake.table_uri(REJECTED_IMAGES))
    assert table.version() == version + 2  # one commit each
    assert sorted(
        DeltaTable(lake.table_uri(REJECTED_IMAGES), version=version).to_pyarrow_table()["image_id"].to_pylist()
    ) == ["1", "2", "3", "4"]  # a reader of the older version still reads it whole
    assert all(Path(uri).is_file() for uri in table.file_uris())


def test_a_streamed_write_creates_a_missing_table_and_an_empty_stream_empties_the_partition(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    assert (
        lake.write_partition_stream(
            REJECTED_IMAGES, _batches(rejected_rows("a", ["1", "2", "3"])), REJECTED_IMAGES_SCHEMA, "a"
        )
        == 3
    )
    lake.write_partition(REJECTED_IMAGES, rejected_rows("b", ["4"]), "b")
    assert _ids_by_prefix(lake) == {"a": ["1", "2", "3"], "b": ["4"]}
    assert lake.write_partition_stream(REJECTED_IMAGES, [], REJECTED_IMAGES_SCHEMA, "a") == 0
    assert _ids_by_prefix(lake) == {"b": ["4"]}


def test_a_streamed_write_refuses_rows_of_another_partition_and_leaves_no_file(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.write_partition(REJECTED_IMAGES, rejected_rows("a", ["1"]), "a")
    before = {str(path) for path in Path(lake.table_uri(REJECTED_IMAGES)).rglob("*.parquet")}
    stray = _batches(rejected_rows("a", ["2", "3"])) + _batches(rejected_rows("b", ["4"]))
    with pytest.raises(LakeError):
        lake.write_partition_stream(REJECTED_IMAGES, stray, REJECTED_IMAGES_SCHEMA, "a")
    assert _ids_by_prefix(lake) == {"a": ["1"]}
    assert {str(path) for path in Path(lake.table_uri(REJECTED_IMAGES)).rglob("*.parquet")} == before
