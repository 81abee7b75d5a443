"""Finding partitions and noticing when their objects change.

A prefix's fingerprint is a hash of its listing (key, ETag, size of every
object), so adding, removing or replacing an object changes it, and an
unchanged prefix keeps it. A tick lists the prefixes (one cheap delimited
listing), then fingerprints only new prefixes and the most recent few; a full
reconciliation fingerprints them all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Final

from botocore.exceptions import BotoCoreError, ClientError

from imgemb_assets.core.storage import ObjectInfo, ObjectStore, StorageError, partition_key_problem

# A prefix whose listing fails for one of these is reported and tried again next
# tick; the other prefixes go on. Anything else is a bug and fails the tick.
LISTING_ERRORS = (OSError, StorageError, ClientError, BotoCoreError)


def listing_fingerprint(objects: Iterable[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.key):
        digest.update(f"{obj.key}\0{obj.etag}\0{obj.size_bytes}\n".encode())
    return digest.hexdigest()[:32]


# Prefixes listed at once: an S3 listing is a round trip or more, and a reconciliation
# tick lists hundreds (sequential listings were 60% of such a tick on S3). Well
# under S3Settings.max_pool_connections, so listings never wait for a connection.
LISTING_THREADS: Final = 8


def fingerprint_prefixes(store: ObjectStore, prefixes: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each prefix's listing fingerprint, listed `LISTING_THREADS` at a time; and the prefixes whose listing failed
    (-> the error), which the caller reports and tries again later."""

    def fingerprint(prefix: str) -> tuple[str, str | None, str | None]:
        try:
            return prefix, listing_fingerprint(store.list_objects(prefix)), None
        except LISTING_ERRORS as exc:
            return prefix, None, f"{type(exc).__name__}: {exc}"

    fingerprints: dict[str, str] = {}
    errors: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=LISTING_THREADS, thread_name_prefix="listing") as pool:
        for prefix, found, error in pool.map(fingerprint, prefixes):
            if found is not None:
                fingerprints[prefix] = found
            else:
                errors[prefix] = str(error)
    return fingerprints, errors


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
    root_objects: list[str]  # directly under the root: in no partition
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
    store: ObjectStore,
    cursor: DiscoveryCursor | KnownPrefixes,
    recent: int,
    full: bool = False,
    max_new: int | None = None,
) -> DiscoveryPlan:
    """What a tick must register and request, and (given a cursor) the cursor to store after it.

    At most `max_new` new prefixes are taken per tick, so a first tick over a
    large bucket stays within a sensor's time limit; the rest come next tick.
    With `full`, every prefix is fingerprinted, including known prefixes that
    vanished from the root (their partitions are requested so they empty out).
    A prefix is changed when its fingerprint differs from the one last reported;
    a new prefix always is.
    """
    known = cursor.known() if isinstance(cursor, DiscoveryCursor) else cursor
    listing = store.list_partition_folders()
    current = listing.prefixes
    # A key an earlier version took ('' from '<root>//', say) is never listed again:
    # listing '' would fingerprint the whole root.
    known_prefixes = {prefix for prefix in known.prefixes if partition_key_problem(prefix) is None}
    to_list = (
        sorted(set(current) | known_prefixes) if full else prefixes_to_fingerprint(current, known_prefixes, recent, max_new)
    )
    fingerprints, listing_errors = fingerprint_prefixes(store, to_list)
    previous = known.fingerprints_of([prefix for prefix in fingerprints if prefix in known_prefixes])
    changed = {prefix: fp for prefix, fp in fingerprints.items() if previous.get(prefix) != fp}
    return DiscoveryPlan(
        new_prefixes=[prefix for prefix in fingerprints if prefix not in known_prefixes and prefix in current],
        listed_prefixes=current,
        changed=changed,
        root_objects=store.list_root_files(),
        cursor=_next_cursor(cursor, fingerprints) if isinstance(cursor, DiscoveryCursor) else None,
        prefixes_listed=len(to_list),
        refused_prefixes=listing.refused,
        listing_errors=listing_errors,
    )


def _next_cursor(cursor: DiscoveryCursor, fingerprints: Mapping[str, str]) -> DiscoveryCursor:
    kept = {prefix: fp for prefix, fp in cursor.fingerprints.items() if partition_key_problem(prefix) is None}
    return DiscoveryCursor({**kept, **fingerprints}, cursor.vanished)
