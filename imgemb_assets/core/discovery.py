"""Finding partitions and noticing when their objects change.

A partition's fingerprint is a hash of its listing (key, ETag, size of every
object), so adding, removing or replacing an object changes it, and an
unchanged partition keeps it. A tick walks the root down to its partition
folders (one cheap delimited listing for the default scheme, which also finds
the loose objects), then fingerprints only new folders and the most recent few;
a full reconciliation fingerprints them all. "Prefix" and "partition" mean the
same here: a partition key of the scheme (`partition_scheme.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from botocore.exceptions import BotoCoreError, ClientError

from imgemb_assets.core.partition_scheme import PartitionScheme
from imgemb_assets.core.partitioned_root import PartitionedRoot, UnitListing
from imgemb_assets.core.storage import ObjectInfo, ObjectStore, StorageError, partition_key_problem

# A prefix whose listing fails for one of these is reported and tried again next
# tick; the other prefixes go on. Anything else is a bug and fails the tick.
LISTING_ERRORS = (OSError, StorageError, ClientError, BotoCoreError)


def listing_fingerprint(objects: Iterable[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"{obj.key}\0{obj.etag}\0{obj.size_bytes}\n".encode())
    return digest.hexdigest()[:32]


# Units listed at once: an S3 listing is a round trip or more, and a reconciliation
# tick lists hundreds (sequential listings were 60% of such a tick on S3). Well
# under S3Settings.max_pool_connections, so listings never wait for a connection.
LISTING_THREADS: Final = 8


def as_partitioned_root(root: PartitionedRoot | ObjectStore) -> PartitionedRoot:
    """A store alone is cut by the default scheme."""
    return root if isinstance(root, PartitionedRoot) else PartitionedRoot(root, PartitionScheme())


@dataclass(frozen=True)
class UnitFingerprints:
    """Fingerprints of every partition of the units listed (empty ones included), and which hold objects."""

    fingerprints: dict[str, str]
    holding: set[str]
    errors: dict[str, str]  # unit -> the error of its listing (reported, tried again later)


def fingerprint_units(root: PartitionedRoot, units: Sequence[str], loose: bool) -> UnitFingerprints:
    """Each listed unit's partitions' fingerprints, units listed `LISTING_THREADS` at a time; with `loose`, the loose buckets too."""

    def listed(unit: str) -> tuple[str, UnitListing | None, str | None]:
        try:
            return unit, root.list_unit(unit), None
        except LISTING_ERRORS as exc:
            return unit, None, f"{type(exc).__name__}: {exc}"

    fingerprints: dict[str, str] = {}
    holding: set[str] = set()
    errors: dict[str, str] = {}

    def add(listing: UnitListing) -> None:
        for key, objects in listing.by_partition.items():
            fingerprints[key] = listing_fingerprint(objects)
        holding.update(listing.holding())

    with ThreadPoolExecutor(max_workers=LISTING_THREADS, thread_name_prefix="listing") as pool:
        for unit, listing, error in pool.map(listed, units):
            if listing is not None:
                add(listing)
            else:
                errors[unit] = str(error)
    if loose:
        add(root.loose_listing())
    return UnitFingerprints(fingerprints, holding, errors)


def fingerprint_prefixes(
    root: PartitionedRoot | ObjectStore, prefixes: Sequence[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """Each partition's listing fingerprint, each unit listed once; and the partitions whose listing failed
    (-> the error), which the caller reports and tries again later."""
    root = as_partitioned_root(root)
    places = {prefix: root.scheme.place_of(prefix) for prefix in prefixes}
    units = sorted({place.folder for place in places.values() if place.folder is not None})
    loose = any(place.folder is None for place in places.values())
    found = fingerprint_units(root, units, loose)
    fingerprints = {prefix: found.fingerprints.get(prefix, listing_fingerprint([])) for prefix in prefixes}
    errors = {prefix: found.errors[place.folder] for prefix, place in places.items() if place.folder in found.errors}
    return {prefix: fp for prefix, fp in fingerprints.items() if prefix not in errors}, errors


_CURSOR_VERSION = 2  # version 1 was the bare {prefix: fingerprint} object (read as before)


@dataclass(frozen=True)
class DiscoveryCursor:
    """The fingerprint of each prefix as last requested, and the registered prefixes last seen vanished."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    vanished: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, text: str | None) -> DiscoveryCursor:
        if not text:
            return cls()
        data = json.loads(text)
        # A version-1 cursor maps prefixes to fingerprint strings, so an integer
        # `version` can only be a later format's.
        if isinstance(data.get("version"), int):
            return cls(dict(data["fingerprints"]), tuple(data.get("vanished", ())))
        return cls(dict(data))

    def to_json(self) -> str:
        return json.dumps(
            {"version": _CURSOR_VERSION, "fingerprints": self.fingerprints, "vanished": list(self.vanished)},
            sort_keys=True,
            ensure_ascii=False,
        )

    def known(self) -> KnownPrefixes:
        return KnownPrefixes(frozenset(self.fingerprints), lambda prefixes: _fingerprints_in(self.fingerprints, prefixes))


@dataclass(frozen=True)
class KnownPrefixes:
    """The prefixes discovery already knows, and how to fetch the fingerprint last reported for some of them.

    A sensor keeps this in the Dagster instance (the registered partitions and the
    fingerprints it reported), not in its cursor: a cursor holding one fingerprint per
    prefix is rewritten whole every tick, about 0.5 MB at 10,000 prefixes.
    """

    prefixes: frozenset[str]
    # The fingerprints last reported for these prefixes; a prefix without one is left out.
    fingerprints_of: Callable[[Sequence[str]], Mapping[str, str]]


def _fingerprints_in(fingerprints: Mapping[str, str], prefixes: Sequence[str]) -> dict[str, str]:
    return {prefix: fingerprints[prefix] for prefix in prefixes if prefix in fingerprints}


def vanished_prefixes(registered: Iterable[str], listed: Iterable[str]) -> list[str]:
    """Registered prefixes with no object left under the root (a prefix exists only while it holds objects)."""
    return sorted(set(registered) - set(listed))


@dataclass(frozen=True)
class DiscoveryPlan:
    new_prefixes: list[str]  # to register as partitions
    listed_prefixes: list[str]  # every prefix holding objects now
    changed: dict[str, str]  # prefix -> new fingerprint: to (re)materialize
    root_objects: list[str]  # loose objects the scheme puts in no partition (keys)
    # The cursor to store after this tick, when the known prefixes came from one (None otherwise).
    cursor: DiscoveryCursor | None
    prefixes_listed: int  # how many prefixes were fingerprinted this tick
    # first path segments that are no partition (name as shown -> why): their objects are in none
    refused_prefixes: dict[str, str] = field(default_factory=dict)
    # prefixes whose listing failed this tick (-> the error): neither registered nor requested, tried again next tick
    listing_errors: dict[str, str] = field(default_factory=dict)


def prefixes_to_fingerprint(
    current: list[str], known: Collection[str], recent: int, max_new: int | None = None
) -> list[str]:
    """New prefixes (at most `max_new`), plus the `recent` greatest known ones (date prefixes sort by recency)."""
    new = sorted(prefix for prefix in current if prefix not in known)
    existing = sorted(prefix for prefix in current if prefix in known)
    return sorted(set(new[:max_new]) | set(existing[-recent:] if recent > 0 else []))


def plan_discovery(
    root: PartitionedRoot | ObjectStore,
    cursor: DiscoveryCursor | KnownPrefixes,
    recent: int,
    full: bool = False,
    max_new: int | None = None,
) -> DiscoveryPlan:
    """What a tick must register and request, and (given a cursor) the cursor to store after it.

    The root is walked down to its partition folders (one delimited listing of the
    root for the default scheme), which also finds the loose objects and so
    fingerprints their buckets without another listing. Then only new partition
    folders (at most `max_new` per tick, so a first tick over a large bucket stays
    within a sensor's time limit) and the `recent` greatest known ones are listed.
    With `full`, every folder is, including known ones that vanished from the root
    (their partitions are requested so they empty out). A partition is changed when
    its fingerprint differs from the one last reported; a new partition always is.
    A store given alone is cut by the default scheme.
    """
    root = as_partitioned_root(root)
    scheme = root.scheme
    known = cursor.known() if isinstance(cursor, DiscoveryCursor) else cursor
    # A key an earlier version took ('' from '<root>//'), or one of another scheme, is never listed:
    # listing '' would fingerprint the whole root.
    known_keys = {key for key in known.prefixes if partition_key_problem(key) is None and scheme.is_partition_key(key)}
    walk = root.walk()
    known_units = {unit for key in known_keys if (unit := scheme.place_of(key).folder) is not None}
    to_list = (
        sorted(set(walk.folders) | known_units)
        if full
        else prefixes_to_fingerprint(walk.folders, known_units, recent, max_new)
    )
    found = fingerprint_units(root, to_list, loose=True)
    # Partitions holding objects now: those found, and those of folders present but not listed
    # (or whose listing failed) this tick, as known.
    present = set(walk.folders)
    listed = set(to_list) - set(found.errors)
    current = set(found.holding)
    if scheme.depth > 0 and not scheme.splits_folders:
        current |= present  # a folder is its partition: present while the walk finds it
    else:
        current |= {key for key in known_keys if scheme.place_of(key).folder in present - listed}
    fingerprints = {key: fp for key, fp in found.fingerprints.items() if key in found.holding or key in known_keys}
    previous = known.fingerprints_of([key for key in fingerprints if key in known_keys])
    changed = {key: fp for key, fp in fingerprints.items() if previous.get(key) != fp}
    return DiscoveryPlan(
        new_prefixes=sorted(key for key in found.holding if key not in known_keys),
        listed_prefixes=sorted(current),
        changed=changed,
        root_objects=root.uncovered_names(),
        cursor=_next_cursor(cursor, fingerprints) if isinstance(cursor, DiscoveryCursor) else None,
        prefixes_listed=len(to_list),
        refused_prefixes=walk.refused,
        listing_errors=found.errors,
    )


def _next_cursor(cursor: DiscoveryCursor, fingerprints: Mapping[str, str]) -> DiscoveryCursor:
    kept = {prefix: fp for prefix, fp in cursor.fingerprints.items() if partition_key_problem(prefix) is None}
    return DiscoveryCursor({**kept, **fingerprints}, cursor.vanished)
