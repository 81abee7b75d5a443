"""Prefix fingerprints and the discovery plan: new prefixes, changed ones, recent-only re-listing, full reconciliation,
and names or listings that fail without stopping the other prefixes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from imgemb_assets.core.ingest.discovery import (
    DiscoveryCursor,
    listing_fingerprint,
    plan_discovery,
    prefixes_to_fingerprint,
    vanished_prefixes,
)
from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.storage.errors import StorageError
from imgemb_assets.core.storage.local_store import LocalObjectStore
from imgemb_assets.core.storage.objects import ObjectInfo
from imgemb_assets.core.storage.open_store import open_object_store


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for key, body in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(body)


def test_fingerprint_changes_when_an_object_is_added_removed_or_replaced(tmp_path: Path) -> None:
    _tree(tmp_path, {"p/a.jpg": b"a", "p/b.jpg": b"b"})
    store = open_object_store(str(tmp_path))
    original = listing_fingerprint(store.list_objects("p"))
    assert listing_fingerprint(store.list_objects("p")) == original
    (tmp_path / "p" / "c.jpg").write_bytes(b"c")
    added = listing_fingerprint(store.list_objects("p"))
    (tmp_path / "p" / "c.jpg").unlink()
    assert listing_fingerprint(store.list_objects("p")) == original
    (tmp_path / "p" / "a.jpg").write_bytes(b"A")
    replaced = listing_fingerprint(store.list_objects("p"))
    (tmp_path / "p" / "b.jpg").unlink()
    removed = listing_fingerprint(store.list_objects("p"))
    assert len({original, added, replaced, removed}) == 4


def test_second_tick_with_the_returned_cursor_requests_nothing(tmp_path: Path) -> None:
    _tree(tmp_path, {"2026-11-01/a.jpg": b"a", "2026-11-02/b.jpg": b"b", "stray.jpg": b"s"})
    store = open_object_store(str(tmp_path))
    stray_bucket = PartitionScheme().partition_of("stray.jpg")
    assert stray_bucket is not None and stray_bucket.startswith("(loose)/part-")
    first = plan_discovery(store, DiscoveryCursor(), recent=3)
    assert first.new_prefixes == sorted(["2026-11-01", "2026-11-02", stray_bucket])
    assert sorted(first.changed) == first.new_prefixes
    assert first.root_objects == []  # the default scheme puts loose objects in hash buckets
    second = plan_discovery(store, DiscoveryCursor.from_json(first.cursor.to_json()), recent=3)
    assert second.new_prefixes == [] and second.changed == {}
    without_loose = PartitionedRoot(store, PartitionScheme.parse("folders,loose:0"))
    assert plan_discovery(without_loose, DiscoveryCursor(), recent=3).root_objects == ["stray.jpg"]


def test_a_changed_recent_prefix_is_requested_again(tmp_path: Path) -> None:
    _tree(tmp_path, {"2026-11-01/a.jpg": b"a", "2026-11-02/b.jpg": b"b"})
    store = open_object_store(str(tmp_path))
    cursor = plan_discovery(store, DiscoveryCursor(), recent=3).cursor
    (tmp_path / "2026-11-02" / "c.jpg").write_bytes(b"c")
    plan = plan_discovery(store, cursor, recent=3)
    assert list(plan.changed) == ["2026-11-02"]
    assert plan.new_prefixes == []


def test_only_new_and_recent_prefixes_are_listed_and_full_reconciliation_lists_all(tmp_path: Path) -> None:
    _tree(tmp_path, {f"2026-10-{day:02d}/a.jpg": b"a" for day in range(1, 11)})
    store = open_object_store(str(tmp_path))
    cursor = plan_discovery(store, DiscoveryCursor(), recent=2).cursor
    (tmp_path / "2026-10-01" / "late.jpg").write_bytes(b"late")  # an old prefix changes
    _tree(tmp_path, {"2026-10-11/a.jpg": b"a"})
    tick = plan_discovery(store, cursor, recent=2)
    assert tick.prefixes_listed == 3  # the new one and the two most recent known ones
    assert list(tick.changed) == ["2026-10-11"]
    full = plan_discovery(store, tick.cursor, recent=2, full=True)
    assert full.prefixes_listed == 11
    assert list(full.changed) == ["2026-10-01"]


def test_a_vanished_prefix_is_requested_by_full_reconciliation(tmp_path: Path) -> None:
    _tree(tmp_path, {"keep/a.jpg": b"a", "gone/b.jpg": b"b"})
    store = open_object_store(str(tmp_path))
    cursor = plan_discovery(store, DiscoveryCursor(), recent=5).cursor
    (tmp_path / "gone" / "b.jpg").unlink()
    assert plan_discovery(store, cursor, recent=5).changed == {}
    assert list(plan_discovery(store, cursor, recent=5, full=True).changed) == ["gone"]


def test_new_prefixes_are_taken_a_bounded_number_per_tick(tmp_path: Path) -> None:
    _tree(tmp_path, {f"p{number:02d}/a.jpg": b"a" for number in range(5)})
    store = open_object_store(str(tmp_path))
    cursor, taken = DiscoveryCursor(), []
    for _tick in range(3):
        plan = plan_discovery(store, cursor, recent=0, max_new=2)
        assert plan.new_prefixes == sorted(plan.changed) and len(plan.new_prefixes) <= 2
        taken += plan.new_prefixes
        cursor = plan.cursor
    assert taken == [f"p{number:02d}" for number in range(5)]
    assert plan_discovery(store, cursor, recent=0, max_new=2).changed == {}


def test_prefixes_to_fingerprint() -> None:
    assert prefixes_to_fingerprint(["a", "b", "c", "d"], {"a": "1", "b": "1", "c": "1"}, recent=1) == ["c", "d"]
    assert prefixes_to_fingerprint(["a", "b"], {"a": "1", "b": "1"}, recent=0) == []


def test_a_name_that_is_not_utf8_stops_no_tick(tmp_path: Path) -> None:
    _tree(tmp_path, {"a/ok.jpg": b"a", "b/ok.jpg": b"b"})
    (tmp_path / "a" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"latin1 file name")
    (tmp_path / os.fsdecode(b"r\xe9sum\xe9")).mkdir()
    (tmp_path / os.fsdecode(b"r\xe9sum\xe9") / "c.jpg").write_bytes(b"c")
    plan = plan_discovery(open_object_store(str(tmp_path)), DiscoveryCursor(), recent=3)
    assert plan.new_prefixes == ["a", "b"]
    assert plan.refused_prefixes == {
        "r\\xe9sum\\xe9": "name is not valid UTF-8 (its bytes are shown as \\xNN): rename it in UTF-8"
    }
    assert DiscoveryCursor.from_json(plan.cursor.to_json()) == plan.cursor


def test_a_key_an_older_version_registered_is_dropped_not_listed(tmp_path: Path) -> None:
    # '' (from '<root>//') stood for the whole root: listing it would fingerprint everything.
    _tree(tmp_path, {"a/ok.jpg": b"a"})
    plan = plan_discovery(open_object_store(str(tmp_path)), DiscoveryCursor({"": "0" * 32}), recent=3, full=True)
    assert plan.prefixes_listed == 1 and list(plan.changed) == ["a"]
    assert plan.cursor.fingerprints.keys() == {"a"}


class _OnePrefixFails(LocalObjectStore):
    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix == "b":
            raise StorageError("b cannot be listed right now")
        return super().list_objects(prefix)


def test_a_prefix_whose_listing_fails_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    _tree(tmp_path, {"a/1.jpg": b"a", "b/2.jpg": b"b", "c/3.jpg": b"c"})
    plan = plan_discovery(_OnePrefixFails(tmp_path), DiscoveryCursor(), recent=3)
    assert plan.new_prefixes == ["a", "c"] and sorted(plan.changed) == ["a", "c"]
    assert plan.listing_errors == {"b": "StorageError: b cannot be listed right now"}
    # not in the cursor: the next tick takes it as new again
    assert plan_discovery(open_object_store(str(tmp_path)), plan.cursor, recent=3).new_prefixes == ["b"]


def test_the_cursor_keeps_vanished_prefixes_and_reads_the_earlier_format() -> None:
    cursor = DiscoveryCursor({"2026-11-01": "f1", "version": "a prefix named version"}, vanished=("2026-10-31",))
    assert DiscoveryCursor.from_json(cursor.to_json()) == cursor
    earlier = '{"2026-11-01": "f1", "version": "a prefix named version"}'  # the bare map of before
    assert DiscoveryCursor.from_json(earlier) == DiscoveryCursor(
        {"2026-11-01": "f1", "version": "a prefix named version"}
    )
    assert DiscoveryCursor.from_json(None) == DiscoveryCursor()


def test_a_registered_prefix_missing_from_the_listing_has_vanished() -> None:
    assert vanished_prefixes(["a", "b", "c"], ["a", "c", "d"]) == ["b"]
    assert vanished_prefixes([], ["a"]) == []
