"""The raw-images root as a partition scheme cuts it: its partition folders, its loose objects, each partition's objects.

Listing happens by *unit*: a partition folder (listed recursively, then split
into hash buckets when the scheme splits folders), the whole root for `hash:B`,
or the loose objects, which one walk of the folder levels above the partition
folders finds (one delimited listing per folder there: a single listing of the
root for `folders`). A step or a tick lists each unit at most once
(`PartitionedRoot` remembers what it listed), however many of its partitions
it materializes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from imgemb_assets.core.ingest.partition_scheme import PartitionScheme, folder_problem
from imgemb_assets.core.storage.objects import ObjectInfo, ObjectStore

# Folders listed at once while walking the levels above the partition folders (each
# listing is an S3 round trip or more); the same bound as discovery's listings.
WALK_THREADS: Final = 8


@dataclass(frozen=True)
class RootWalk:
    """One walk of the folder levels above the partition folders."""

    folders: list[str]  # the partition folders holding objects, sorted ([""] under hash:B: the root)
    loose: list[ObjectInfo]  # objects above the partition folders
    refused: dict[str, str] = field(default_factory=dict)  # folders that are no partition (name -> why)


@dataclass(frozen=True)
class UnitListing:
    """A listed unit's objects, by partition key; every partition the unit can hold has an entry (maybe empty)."""

    by_partition: dict[str, list[ObjectInfo]]
    uncovered: list[ObjectInfo] = field(default_factory=list)  # found under the unit, in no partition

    def holding(self) -> list[str]:
        return sorted(key for key, objects in self.by_partition.items() if objects)


class PartitionedRoot:
    """A store and the scheme that cuts it; remembers its walk and unit listings (one per step or tick)."""

    def __init__(self, store: ObjectStore, scheme: PartitionScheme) -> None:
        self.store = store
        self.scheme = scheme
        self._walk: RootWalk | None = None
        self._units: dict[str, UnitListing] = {}
        self._lock = threading.Lock()

    @property
    def root_uri(self) -> str:
        return self.store.root_uri

    def walk(self) -> RootWalk:
        """The partition folders and loose objects now (listed once per PartitionedRoot)."""
        with self._lock:
            if self._walk is None:
                self._walk = _walk_levels(self.store, self.scheme.depth)
            return self._walk

    def list_unit(self, unit: str) -> UnitListing:
        """A partition folder's objects (the root's under hash:B), grouped by partition; listed once."""
        with self._lock:
            cached = self._units.get(unit)
        if cached is not None:
            return cached
        by_partition: dict[str, list[ObjectInfo]] = {key: [] for key in self.scheme.partitions_of_folder(unit)}
        for obj in self.store.list_objects(unit):
            by_partition.setdefault(self.scheme.partition_in_folder(unit, obj.key), []).append(obj)
        listing = UnitListing(by_partition)
        with self._lock:
            self._units[unit] = listing
        return listing

    def loose_listing(self) -> UnitListing:
        """The loose objects, grouped into their buckets (every bucket present); none when the scheme leaves them out."""
        scheme = self.scheme
        if scheme.depth == 0:
            return UnitListing({})
        if scheme.loose_buckets == 0:
            return UnitListing({}, list(self.walk().loose))
        return self._group(self.walk().loose, scheme.loose_partitions())

    def list_partition(self, partition_key: str) -> list[ObjectInfo]:
        """Every object of one partition, in key order; PartitionSchemeError for a key of another scheme."""
        place = self.scheme.place_of(partition_key)
        if place.folder is None:
            return self.loose_listing().by_partition.get(partition_key, [])
        if place.bucket is None:
            # A whole folder: listed directly, never cached (one partition per listing).
            return list(self.store.list_objects(place.folder))
        return self.list_unit(place.folder).by_partition.get(partition_key, [])

    def current_partitions(self) -> list[str]:
        """Every partition that holds objects now (lists every folder when the scheme splits them)."""
        walk = self.walk()
        found = set(self.loose_listing().holding())
        for folder in walk.folders:
            if self.scheme.splits_folders:
                found.update(self.list_unit(folder).holding())
            else:
                found.add(folder)
        return sorted(found)

    def uncovered_names(self) -> list[str]:
        """Keys of the objects the scheme puts in no partition (loose objects under `loose:0`)."""
        return sorted(obj.key for obj in self.loose_listing().uncovered)

    def _group(self, objects: Iterable[ObjectInfo], keys: Sequence[str]) -> UnitListing:
        by_partition: dict[str, list[ObjectInfo]] = {key: [] for key in keys}
        uncovered: list[ObjectInfo] = []
        for obj in objects:
            partition = self.scheme.partition_of(obj.key)
            if partition is None:
                uncovered.append(obj)
            else:
                by_partition.setdefault(partition, []).append(obj)
        return UnitListing(by_partition, uncovered)


def _walk_levels(store: ObjectStore, depth: int) -> RootWalk:
    if depth == 0:
        return RootWalk([""], [])
    level: list[str] = [""]
    loose: list[ObjectInfo] = []
    refused: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=WALK_THREADS, thread_name_prefix="walk") as pool:
        for _ in range(depth):
            below: list[str] = []
            for listing in pool.map(store.list_folder, level):
                loose += listing.objects
                refused.update(listing.refused)
                for folder in listing.folders:
                    problem = folder_problem(folder.split("/"))
                    if problem is None:
                        below.append(folder)
                    else:
                        refused[folder] = problem
            level = sorted(below)
    loose.sort(key=lambda obj: obj.key)
    return RootWalk(level, loose, refused)
