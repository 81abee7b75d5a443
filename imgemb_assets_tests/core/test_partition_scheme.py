"""Partition schemes: parsing, the partition of every key, listing a root by scheme (flat, date folders three
levels deep, a mixed root, split folders, a whole root hashed) without losing or doubling an object, discovery
under a scheme, and the scheme recorded with the lake."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from imgemb_assets.core.ingest.discovery import DiscoveryCursor, fingerprint_prefixes, plan_discovery
from imgemb_assets.core.ingest.partition_scheme import (
    LOOSE_FOLDER,
    PartitionScheme,
    PartitionSchemeError,
    bucket_of,
)
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.ingest.scheme_record import SchemeMismatchError, recorded_scheme, require_scheme
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import RAW_IMAGE_MANIFEST, RAW_IMAGE_MANIFEST_SCHEMA
from imgemb_assets.core.storage.local_store import LocalObjectStore


def _tree(root: Path, keys: list[str]) -> None:
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(key.encode())


def _root(tmp_path: Path, scheme: str) -> PartitionedRoot:
    return PartitionedRoot(LocalObjectStore(tmp_path), PartitionScheme.parse(scheme))


def _each_object_once(root: PartitionedRoot, keys: list[str]) -> dict[str, str]:
    """object key -> its partition, asserting that the partitions' listings hold every object exactly once."""
    found: dict[str, str] = {}
    for partition in root.current_partitions():
        for obj in root.list_partition(partition):
            assert obj.key not in found, f"{obj.key} is in {found.get(obj.key)} and {partition}"
            found[obj.key] = partition
    assert sorted(found) == sorted(keys)
    return found


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("folders", "folders"),
        ("folders:1", "folders"),
        (" Folders:3 ", "folders:3"),
        ("folders:2,hash:8", "folders:2,hash:8"),
        ("folders,loose:0", "folders,loose:0"),
        ("folders,loose:16", "folders"),
        ("hash:64", "hash:64"),
    ],
)
def test_schemes_parse_to_one_canonical_text(text: str, canonical: str) -> None:
    scheme = PartitionScheme.parse(text)
    assert str(scheme) == canonical
    assert PartitionScheme.parse(str(scheme)) == scheme


@pytest.mark.parametrize(
    "text",
    [
        "",
        "folder",
        "folders:x",
        "hash",
        "hash:1",
        "hash:8,folders:2",
        "folders:9",
        "hash:8,loose:4",
        "folders,folders:2",
    ],
)
def test_a_scheme_that_does_not_parse_says_what_is_accepted(text: str) -> None:
    with pytest.raises(PartitionSchemeError, match="folders"):
        PartitionScheme.parse(text)


def test_the_default_scheme_keeps_first_level_folders_and_hashes_loose_objects() -> None:
    scheme = PartitionScheme()
    assert scheme.partition_of("2026-11-01/img.jpg") == "2026-11-01"
    assert scheme.partition_of("2026-11-01/deep/er/img.jpg") == "2026-11-01"
    loose = scheme.partition_of("img_0001.jpg")
    assert loose is not None and loose.startswith(f"{LOOSE_FOLDER}/part-") and loose.endswith("-of-16")
    assert scheme.place_of(loose).holds("img_0001.jpg")
    assert scheme.partition_of(f"{LOOSE_FOLDER}/x.jpg") is None  # the reserved folder name is no partition


def test_hash_buckets_are_stable_and_spread_the_keys() -> None:
    keys = [f"img_{number:05d}.jpg" for number in range(4000)]
    first = [bucket_of(key, 16) for key in keys]
    assert first == [bucket_of(key, 16) for key in keys]
    counts = Counter(first)
    assert len(counts) == 16 and min(counts.values()) > 4000 / 16 * 0.7
    scheme = PartitionScheme.parse("hash:16")
    assert {scheme.partition_of(key) for key in keys} == set(scheme.partitions_of_folder(""))


def test_keys_of_another_scheme_are_refused() -> None:
    dated = PartitionScheme.parse("folders:3")
    assert dated.is_partition_key("2026/11/01")
    for key in ("2026-11-01", "2026/11", "2026/11/01/02", "part-03-of-16", f"{LOOSE_FOLDER}/part-3-of-16"):
        assert not dated.is_partition_key(key), key
    with pytest.raises(PartitionSchemeError, match="no partition key of the partition scheme 'folders:3'"):
        dated.place_of("2026-11-01")


def test_the_articles_flat_root_is_cut_into_loose_buckets_and_loses_nothing(tmp_path: Path) -> None:
    keys = [f"img_{number:04d}.jpg" for number in range(89)]
    _tree(tmp_path, keys)
    root = _root(tmp_path, "folders")
    placed = _each_object_once(root, keys)
    assert all(partition.startswith(f"{LOOSE_FOLDER}/") for partition in placed.values())
    assert 1 < len(set(placed.values())) <= 16


def test_date_folders_three_levels_deep_give_one_partition_per_day(tmp_path: Path) -> None:
    keys = [
        f"2026/{month:02d}/{day:02d}/img_{month}_{day}_{n}.jpg"
        for month in (10, 11)
        for day in (1, 2, 30)
        for n in range(3)
    ]
    keys += ["2026/11/readme.jpg", "stray.jpg"]  # above the day folders: loose objects
    _tree(tmp_path, keys)
    root = _root(tmp_path, "folders:3")
    placed = _each_object_once(root, keys)
    days = sorted({partition for partition in placed.values() if not partition.startswith(LOOSE_FOLDER)})
    assert days == [f"2026/{month:02d}/{day:02d}" for month in (10, 11) for day in (1, 2, 30)]
    assert placed["2026/11/readme.jpg"].startswith(LOOSE_FOLDER) and placed["stray.jpg"].startswith(LOOSE_FOLDER)


def test_a_mixed_root_loses_nothing_under_any_scheme(tmp_path: Path) -> None:
    keys = ["a/1.jpg", "a/sub/2.jpg", "b/3.jpg", "loose1.jpg", "loose2.png", "c/d/e/4.jpg"]
    _tree(tmp_path, keys)
    for scheme in ("folders", "folders:2", "folders,hash:4", "hash:4"):
        _each_object_once(_root(tmp_path, scheme), keys)


def test_loose_objects_left_out_are_named_not_lost_silently(tmp_path: Path) -> None:
    _tree(tmp_path, ["a/1.jpg", "loose.jpg"])
    root = _root(tmp_path, "folders,loose:0")
    assert root.current_partitions() == ["a"]
    assert root.uncovered_names() == ["loose.jpg"]


def test_a_split_folder_is_listed_once_for_all_its_buckets(tmp_path: Path) -> None:
    keys = [f"big/img_{number:03d}.jpg" for number in range(200)]
    _tree(tmp_path, keys)
    listings: list[str] = []

    class Counting(LocalObjectStore):
        def list_objects(self, prefix: str):  # type: ignore[no-untyped-def]
            listings.append(prefix)
            return super().list_objects(prefix)

    root = PartitionedRoot(Counting(tmp_path), PartitionScheme.parse("folders,hash:8"))
    placed = _each_object_once(root, keys)
    assert len(set(placed.values())) == 8 and listings == ["big"]


def test_discovery_under_a_deep_scheme_registers_days_and_notices_a_changed_day(tmp_path: Path) -> None:
    _tree(tmp_path, ["2026/11/01/a.jpg", "2026/11/02/b.jpg"])
    root = _root(tmp_path, "folders:3")
    first = plan_discovery(root, DiscoveryCursor(), recent=1)
    assert first.new_prefixes == ["2026/11/01", "2026/11/02"] and sorted(first.changed) == first.new_prefixes
    _tree(tmp_path, ["2026/11/02/c.jpg"])
    second = plan_discovery(_root(tmp_path, "folders:3"), first.cursor, recent=1)
    assert second.new_prefixes == [] and list(second.changed) == ["2026/11/02"]
    fingerprints, errors = fingerprint_prefixes(_root(tmp_path, "folders:3"), ["2026/11/02"])
    assert errors == {} and fingerprints == second.changed


def test_a_loose_object_added_changes_only_its_bucket(tmp_path: Path) -> None:
    keys = [f"img_{number:03d}.jpg" for number in range(40)]
    _tree(tmp_path, keys)
    first = plan_discovery(_root(tmp_path, "folders"), DiscoveryCursor(), recent=3)
    _tree(tmp_path, ["img_new.jpg"])
    second = plan_discovery(_root(tmp_path, "folders"), first.cursor, recent=3)
    assert list(second.changed) == [PartitionScheme().partition_of("img_new.jpg")]


def test_a_new_lake_records_its_scheme_and_refuses_another(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    assert recorded_scheme(lake) is None
    dated = PartitionScheme.parse("folders:3")
    require_scheme(lake, dated)
    require_scheme(lake, PartitionScheme.parse("folders:3"))  # the same scheme again
    assert recorded_scheme(lake) == dated
    with pytest.raises(SchemeMismatchError, match="written with partition scheme 'folders:3'.*asks for 'folders'"):
        require_scheme(lake, PartitionScheme())


def test_a_lake_from_before_schemes_is_taken_as_written_with_the_default(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(RAW_IMAGE_MANIFEST, _manifest_rows(), "2026-11-01")
    assert recorded_scheme(lake) == PartitionScheme()
    with pytest.raises(SchemeMismatchError):
        require_scheme(lake, PartitionScheme.parse("hash:8"))
    require_scheme(lake, PartitionScheme())


def _manifest_rows() -> pa.Table:
    row = {"image_id": "a", "prefix": "2026-11-01", "uri": "/x/a.jpg", "size_bytes": 1, "etag": "e"}
    return pa.Table.from_pylist([row | {"last_modified": datetime.now(UTC)}], schema=RAW_IMAGE_MANIFEST_SCHEMA)
