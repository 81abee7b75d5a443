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
from typing import Final, cast

from botocore.exceptions import BotoCoreError, ClientError

from imgemb_assets.core.ingest.partition_scheme import PartitionScheme, folder_problem
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot, UnitListing
from imgemb_assets.core.storage.errors import StorageError
from imgemb_assets.core.storage.names import partition_key_problem
from imgemb_assets.core.storage.objects import ObjectInfo, ObjectStore

# A prefix whose listing fails for one of these is reported and tried again next
# tick; the other prefixes go on. Anything else is a bug and fails the tick.
LISTING_ERRORS = (OSError, StorageError, ClientError, BotoCoreError)


def listing_fingerprint(objects: Iterable[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"{obj.key}\0{obj.etag}\0{obj.size_bytes}\n".encode())
    return digest.hexdigest()[:32]


# Loose-object buckets are fingerprinted by a sum (mod 2**128) of each object's hash: the same
# listing gives the same value in any order and in any number of slices, so a root too big to
# list in one tick is fingerprinted across several (see LoosePass).
_SUM_MODULUS: Final = 1 << 128


def summed_fingerprint(objects: Iterable[ObjectInfo], start: str | None = None) -> str:
    """An order-free fingerprint of a listing (key, ETag, size of every object), added onto `start` (another one)."""
    total = int(start, 16) if start else 0
    for obj in objects:
        digest = hashlib.sha256(f"{obj.key}\0{obj.etag}\0{obj.size_bytes}\n".encode("utf-8", "surrogatepass")).digest()
        total = (total + int.from_bytes(digest[:16], "big")) % _SUM_MODULUS
    return f"{total:032x}"


def partition_fingerprint(scheme: PartitionScheme, partition_key: str, objects: Iterable[ObjectInfo]) -> str:
    """The fingerprint a partition's listing is compared by: summed for loose-object buckets, else `listing_fingerprint`."""
    if scheme.is_partition_key(partition_key) and scheme.place_of(partition_key).folder is None:
        return summed_fingerprint(objects)
    return listing_fingerprint(objects)


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
        listing = root.loose_listing()
        fingerprints.update({key: summed_fingerprint(objects) for key, objects in listing.by_partition.items()})
        holding.update(listing.holding())
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
    fingerprints = {
        prefix: found.fingerprints.get(prefix, partition_fingerprint(root.scheme, prefix, [])) for prefix in prefixes
    }
    errors = {prefix: found.errors[place.folder] for prefix, place in places.items() if place.folder in found.errors}
    return {prefix: fp for prefix, fp in fingerprints.items() if prefix not in errors}, errors


_CURSOR_VERSION = 2  # version 1 was the bare {prefix: fingerprint} object (read as before)


@dataclass(frozen=True)
class LoosePass:
    """A listing of the root's first level that spans several ticks: where the next tick resumes, and the
    summed fingerprints of the loose-object buckets so far (a few hundred bytes for 16 buckets)."""

    resume_after: str
    sums: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"resume_after": self.resume_after, "sums": self.sums}

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> LoosePass | None:
        if not data:
            return None
        sums = cast(Mapping[str, object], data.get("sums") or {})  # as to_dict wrote it
        return cls(str(data["resume_after"]), {str(k): str(v) for k, v in sums.items()})


@dataclass(frozen=True)
class DiscoveryCursor:
    """The fingerprint of each prefix as last requested, the registered prefixes last seen vanished, and a root
    listing in progress across ticks."""

    fingerprints: dict[str, str] = field(default_factory=dict)
    vanished: tuple[str, ...] = ()
    loose_pass: LoosePass | None = None

    @classmethod
    def from_json(cls, text: str | None) -> DiscoveryCursor:
        if not text:
            return cls()
        data = json.loads(text)
        # A version-1 cursor maps prefixes to fingerprint strings, so an integer
        # `version` can only be a later format's.
        if isinstance(data.get("version"), int):
            return cls(
                dict(data["fingerprints"]), tuple(data.get("vanished", ())), LoosePass.from_dict(data.get("loose_pass"))
            )
        return cls(dict(data))

    def to_json(self) -> str:
        data: dict[str, object] = {
            "version": _CURSOR_VERSION,
            "fingerprints": self.fingerprints,
            "vanished": list(self.vanished),
        }
        if self.loose_pass is not None:
            data["loose_pass"] = self.loose_pass.to_dict()
        return json.dumps(data, sort_keys=True, ensure_ascii=False)

    def known(self) -> KnownPrefixes:
        return KnownPrefixes(
            frozenset(self.fingerprints), lambda prefixes: _fingerprints_in(self.fingerprints, prefixes)
        )


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
    # The root listing still in progress after this tick (None: the tick saw the whole root).
    loose_pass: LoosePass | None = None


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
    max_root_pages: int | None = None,
    loose_pass: LoosePass | None = None,
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

    With `max_root_pages` (first-level schemes), a tick lists at most that many pages
    of the root (1,000 keys each on S3), resuming where `loose_pass` (the previous
    tick's `plan.loose_pass`) stopped: the loose buckets' fingerprints are compared
    once the pass reaches the end of the root, and vanished folders are judged only
    by a pass that sees the whole root in one tick.
    """
    root = as_partitioned_root(root)
    scheme = root.scheme
    known = cursor.known() if isinstance(cursor, DiscoveryCursor) else cursor
    if isinstance(cursor, DiscoveryCursor) and loose_pass is None:
        loose_pass = cursor.loose_pass
    # A key an earlier version took ('' from '<root>//'), or one of another scheme, is never listed:
    # listing '' would fingerprint the whole root.
    known_keys = {key for key in known.prefixes if partition_key_problem(key) is None and scheme.is_partition_key(key)}
    known_units = {unit for key in known_keys if (unit := scheme.place_of(key).folder) is not None}
    tick = _root_this_tick(root, max_root_pages, loose_pass)
    to_list = (
        sorted(set(tick.folders) | known_units)
        if full
        else prefixes_to_fingerprint(
            sorted(set(tick.folders) | (known_units if tick.partial else set())), known_units, recent, max_new
        )
    )
    found = fingerprint_units(root, to_list, loose=False)
    found.fingerprints.update(tick.loose_fingerprints)
    found.holding.update(key for key, fp in tick.loose_fingerprints.items() if fp != summed_fingerprint([]))
    # Partitions holding objects now: those found, and those of folders present but not listed
    # (or whose listing failed) this tick, as known. A partial pass cannot tell what vanished.
    present = set(tick.folders) | (known_units if tick.partial else set())
    listed = set(to_list) - set(found.errors)
    current = set(found.holding)
    if scheme.depth > 0 and not scheme.splits_folders:
        current |= present  # a folder is its partition: present while the walk finds it
    else:
        current |= {key for key in known_keys if scheme.place_of(key).folder in present - listed}
    if tick.partial or loose_pass is not None:
        current |= {key for key in known_keys if scheme.place_of(key).folder is None}
    fingerprints = {key: fp for key, fp in found.fingerprints.items() if key in found.holding or key in known_keys}
    previous = known.fingerprints_of([key for key in fingerprints if key in known_keys])
    changed = {key: fp for key, fp in fingerprints.items() if previous.get(key) != fp}
    return DiscoveryPlan(
        new_prefixes=sorted(key for key in found.holding if key not in known_keys),
        listed_prefixes=sorted(current),
        changed=changed,
        root_objects=tick.uncovered,
        cursor=_next_cursor(cursor, fingerprints, tick.next_pass) if isinstance(cursor, DiscoveryCursor) else None,
        prefixes_listed=len(to_list),
        refused_prefixes=tick.refused,
        listing_errors=found.errors,
        loose_pass=tick.next_pass,
    )


@dataclass(frozen=True)
class _RootTick:
    """What one tick learnt of the root's folders and loose objects."""

    folders: list[str]  # partition folders seen this tick
    loose_fingerprints: dict[str, str]  # every loose bucket's, once a pass is complete; else none
    uncovered: list[str]  # loose objects in no partition, seen this tick
    refused: dict[str, str]
    next_pass: LoosePass | None  # the pass to resume next tick
    partial: bool  # the tick saw a part of the root only (this pass spans ticks)


def _root_this_tick(root: PartitionedRoot, max_pages: int | None, loose_pass: LoosePass | None) -> _RootTick:
    scheme = root.scheme
    if max_pages is None or scheme.depth != 1:
        walk = root.walk()
        loose = root.loose_listing()
        fingerprints = {key: summed_fingerprint(objects) for key, objects in loose.by_partition.items()}
        return _RootTick(walk.folders, fingerprints, root.uncovered_names(), walk.refused, None, False)
    page = root.store.list_folder_pages("", None if loose_pass is None else loose_pass.resume_after, max_pages)
    sums = dict(loose_pass.sums) if loose_pass is not None else {}
    uncovered: list[str] = []
    for obj in page.listing.objects:
        key = scheme.partition_of(obj.key)
        if key is None:
            uncovered.append(obj.key)
        else:
            sums[key] = summed_fingerprint([obj], sums.get(key))
    refused = dict(page.listing.refused)
    folders = []
    for folder in page.listing.folders:
        problem = folder_problem(folder.split("/"))
        if problem is None:
            folders.append(folder)
        else:
            refused[folder] = problem
    partial = loose_pass is not None or page.resume_after is not None
    if page.resume_after is not None:
        return _RootTick(folders, {}, sorted(uncovered), refused, LoosePass(page.resume_after, sums), partial)
    empty = summed_fingerprint([])
    fingerprints = {key: sums.get(key, empty) for key in scheme.loose_partitions()}
    return _RootTick(folders, fingerprints, sorted(uncovered), refused, None, partial)


def _next_cursor(
    cursor: DiscoveryCursor, fingerprints: Mapping[str, str], loose_pass: LoosePass | None
) -> DiscoveryCursor:
    kept = {prefix: fp for prefix, fp in cursor.fingerprints.items() if partition_key_problem(prefix) is None}
    return DiscoveryCursor({**kept, **fingerprints}, cursor.vanished, loose_pass)
