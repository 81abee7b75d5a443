"""Keeping one search index per model, and the near-duplicate table, in step with the embedding table.

A refresh compares each partition's fingerprint in the embedding table (its data
files, `Lake.partition_fingerprints`) with the fingerprints the stored indexes
and the refresh journal recorded, reads only the partitions that changed, and
routes each one's vectors to the index of the model that wrote them: vectors of
two models never share an index. Every index records every partition it was
shown, with zero vectors where its model wrote none.

The journal (`<lake>/_search_index/_refresh.json`) is the commit point of a
whole refresh: every index saved, then the near-duplicate rows of every
partition read, then the journal, holding the fingerprints the refresh started
from and the models it left an index for. A refresh that fails or is killed
anywhere before the journal leaves the previous journal, so the next one reads
again exactly the partitions whose indexes or pairs may not be committed. That
is why a model that appears for the first time may take the partitions the
journal covers as empty without reading them: the refresh that committed them
read them and would have built its index.

Concurrency: every index save and the journal write are compare-and-swap
(`core/storage/conditional_write.py`); a refresh that loses one starts over from what
the winner committed, a few times, then raises. Damage: an index that cannot be
read (a file missing, truncated, not what it should be) is rebuilt from the
embedding table, and the refresh says so in `rebuilt`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index.errors import IndexCommitConflict, IndexMissing, SearchIndexError
from imgemb_assets.core.search.index.partitions import PartitionVectors, read_partition_models
from imgemb_assets.core.search.index.persistence import index_folder_uri, index_root, load_index, save_index
from imgemb_assets.core.search.index.search_index import SearchIndex, UpdateReport
from imgemb_assets.core.search.index.stored import set_damaged_index_aside, stored_indexes
from imgemb_assets.core.search.near_duplicates import DEFAULT_SIMILARITY_THRESHOLD, NearDuplicates, find_near_duplicates
from imgemb_assets.core.storage.conditional_write import ConcurrentWrite, Versioned, read_versioned, write_if_unchanged

JOURNAL_NAME: Final = "_refresh.json"
JOURNAL_FORMAT: Final = 1
# A refresh that lost a compare-and-swap to a concurrent one starts over this many times in all.
REFRESH_ATTEMPTS: Final = 4


@dataclass(frozen=True)
class ModelRefresh:
    index: SearchIndex
    update: UpdateReport
    # The read partitions holding vectors of this model, as the index holds them: whose near duplicates were found.
    with_vectors: dict[str, PartitionVectors]


@dataclass(frozen=True)
class IndexRefresh:
    models: dict[str, ModelRefresh]
    partitions_read: tuple[str, ...]
    partitions_removed: tuple[str, ...]
    seconds: float
    # prefix -> model_id -> the pairs written for it (every partition read, maybe with none)
    near_duplicates: dict[str, dict[str, NearDuplicates]] = field(default_factory=dict)
    pairs_written: int = 0
    # model_id (or index folder) -> why its index was rebuilt from the embedding table (or set aside)
    rebuilt: dict[str, str] = field(default_factory=dict)
    attempts: int = 1


@dataclass(frozen=True)
class _Journal:
    fingerprints: dict[str, str]
    widths: dict[str, int]  # model_id -> width, every model the committed refresh left an index for


def refresh_search_indexes(
    lake: Lake, table: str = tables.IMAGE_EMBEDDINGS, threshold: float = DEFAULT_SIMILARITY_THRESHOLD
) -> IndexRefresh:
    """Every model's index and the near-duplicate table brought up to the embedding table's partitions now."""
    started = time.perf_counter()
    redo: set[str] = set()
    for attempt in range(1, REFRESH_ATTEMPTS + 1):
        try:
            refresh = _refresh_once(lake, table, threshold, redo)
        except _JournalLost as lost:
            # Another refresh committed after this one wrote near-duplicate rows from what it
            # read: the next attempt writes those partitions' rows again from what is there now.
            redo |= lost.prefixes
            if attempt == REFRESH_ATTEMPTS:
                raise IndexCommitConflict(str(lost)) from lost
        except IndexCommitConflict:
            if attempt == REFRESH_ATTEMPTS:
                raise
        else:
            return replace(refresh, seconds=time.perf_counter() - started, attempts=attempt)
        time.sleep(random.uniform(0.2, 1.0) * attempt)  # jittered: two losers do not collide again
    raise AssertionError("unreachable: the last attempt returns or raises")


class _JournalLost(Exception):
    def __init__(self, journal: str, prefixes: set[str]) -> None:
        super().__init__(f"{journal} was committed by another refresh since this one read it")
        self.prefixes = prefixes


def _refresh_once(lake: Lake, table: str, threshold: float, redo: set[str]) -> IndexRefresh:
    root = index_root(lake)
    stored_journal = read_versioned(root, JOURNAL_NAME)
    journal = _parsed_journal(stored_journal)
    current = lake.partition_fingerprints(table)
    stored = stored_indexes(lake)
    indexes, rebuilt = _load_or_note_damage(
        lake, set(stored.model_ids) | set(journal.widths if journal else ()), journal
    )
    full_read = journal is None or bool(rebuilt) or bool(stored.damaged)
    recorded = [index.fingerprints() for index in indexes.values()]
    if journal is not None:
        recorded.append(journal.fingerprints)
    to_read = sorted(
        prefix for prefix, fingerprint in current.items()
        if full_read or prefix in redo or any(fingerprints.get(prefix) != fingerprint for fingerprints in recorded)
    )  # fmt: skip
    removed = sorted({prefix for fingerprints in recorded for prefix in fingerprints} - set(current))
    read = {prefix: read_partition_models(lake, prefix, current[prefix], table) for prefix in to_read}
    found_models = {model_id for by_model in read.values() for model_id in by_model}
    models: dict[str, ModelRefresh] = {}
    for model_id in sorted(set(indexes) | found_models | set(rebuilt)):
        index = indexes.get(model_id)
        width = index.width if index is not None else _width_of(model_id, read, journal)
        if width is None:
            continue  # a journaled model with no vector left anywhere and no index: nothing to keep
        fresh = index is None
        index = index or SearchIndex(model_id, width)
        known = index.fingerprints()
        shown = [
            by_model.get(model_id) or _empty(prefix, current[prefix], width)
            for prefix, by_model in read.items()
            if fresh or known.get(prefix) != current[prefix]
        ]
        if fresh and not full_read:
            # the journal covers the partitions not read: none of them holds a vector of this model
            shown += [
                _empty(prefix, fingerprint, width) for prefix, fingerprint in current.items() if prefix not in read
            ]
        update = index.update(shown, removed)
        if update.partitions_touched or fresh:
            save_index(index, lake)
        counts = index.partition_counts()
        with_vectors = {prefix: index.partition_vectors(prefix) for prefix in to_read if counts.get(prefix)}
        models[model_id] = ModelRefresh(index, update, with_vectors)
    rebuilt |= _set_aside_unclaimed(lake, stored.damaged, models)
    found = _near_duplicates_of(models, to_read, threshold)
    pairs = write_near_duplicates(lake, found, removed)
    # The commit point: only now does the journal say these partitions' indexes and pairs are stored.
    body = _journal_body(_Journal(current, {model_id: model.index.width for model_id, model in models.items()}))
    try:
        write_if_unchanged(root, JOURNAL_NAME, body, stored_journal.version)
    except ConcurrentWrite as lost:
        raise _JournalLost(root.file(JOURNAL_NAME), {*found, *removed}) from lost
    return IndexRefresh(models, tuple(to_read), tuple(removed), 0.0, found, pairs, rebuilt)


def _load_or_note_damage(
    lake: Lake, model_ids: set[str], journal: _Journal | None
) -> tuple[dict[str, SearchIndex], dict[str, str]]:
    """The stored indexes that load; the others (damaged, or gone while the journal names them) and why."""
    indexes: dict[str, SearchIndex] = {}
    rebuilt: dict[str, str] = {}
    for model_id in sorted(model_ids):
        try:
            indexes[model_id] = load_index(lake, model_id)
        except IndexMissing:
            if journal is not None and model_id in journal.widths:
                rebuilt[model_id] = f"{index_folder_uri(lake, model_id)} holds no index any more"
        except IndexCommitConflict:
            raise
        except SearchIndexError as damage:
            rebuilt[model_id] = str(damage)
    return indexes, rebuilt


def _set_aside_unclaimed(lake: Lake, damaged: Mapping[str, str], models: Mapping[str, ModelRefresh]) -> dict[str, str]:
    """Damaged folders no model's save replaced: their manifests renamed, so they stop forcing full reads."""
    claimed = {index_folder_uri(lake, model_id) for model_id in models}
    return {
        folder: f"{reason}; no model's vectors belong there, its manifest was renamed to {set_damaged_index_aside(lake, folder)}"
        for folder, reason in sorted(damaged.items())
        if folder not in claimed
    }


def _near_duplicates_of(
    models: Mapping[str, ModelRefresh], to_read: Sequence[str], threshold: float
) -> dict[str, dict[str, NearDuplicates]]:
    """prefix -> model_id -> the partition's pairs against the model's whole index, from the index's own vectors.

    The index's vectors, not the table's: normalised, and without the non-finite
    ones the index left out, so the pairs are those of what can be searched.
    """
    found: dict[str, dict[str, NearDuplicates]] = {prefix: {} for prefix in to_read}
    for model_id, model in models.items():
        for prefix, vectors in model.with_vectors.items():
            found[prefix][model_id] = find_near_duplicates(
                vectors.image_ids, vectors.vectors, prefix, model_id, model.index.search, threshold=threshold
            )
    return found


def write_near_duplicates(lake: Lake, found: Mapping[str, Mapping[str, NearDuplicates]], removed: Sequence[str]) -> int:
    """Replace the near-duplicate rows of every partition read (maybe with none) and drop removed ones; rows found.

    A pair across two partitions is a row in each. So the rows other partitions
    hold about a changed or removed one are rewritten in the same commit: those
    pointing at it are dropped and the mirrors of its new cross pairs added.
    """
    changed = {*found, *removed}
    rows = [result.table for by_model in found.values() for result in by_model.values()]
    data = pa.concat_tables(rows) if rows else tables.NEAR_DUPLICATES_SCHEMA.empty_table()
    mirrors = _mirrored(
        data.filter(pc.invert(pc.is_in(data.column("other_prefix"), pa.array(sorted(changed), pa.string()))))
    )
    existing = lake.read(tables.NEAR_DUPLICATES) if lake.exists(tables.NEAR_DUPLICATES) else data.schema.empty_table()
    elsewhere = existing.filter(
        pc.invert(pc.is_in(existing.column(tables.PARTITION_COLUMN), pa.array(sorted(changed), pa.string())))
    )
    about_changed = pc.is_in(elsewhere.column("other_prefix"), pa.array(sorted(changed), pa.string()))
    touched = set(elsewhere.filter(about_changed).column(tables.PARTITION_COLUMN).to_pylist())
    touched |= set(mirrors.column(tables.PARTITION_COLUMN).to_pylist())
    kept = elsewhere.filter(pc.and_(pc.invert(about_changed),
                                    pc.is_in(elsewhere.column(tables.PARTITION_COLUMN), pa.array(sorted(touched), pa.string()))))  # fmt: skip
    combined = pa.concat_tables([data, mirrors.cast(data.schema), kept.select(data.schema.names).cast(data.schema)])
    lake.replace_partitions(tables.NEAR_DUPLICATES, combined, [*found, *removed, *sorted(touched)])
    return data.num_rows


def _mirrored(pairs: pa.Table) -> pa.Table:
    """The same cross-partition pairs, as the row the other partition holds."""
    swapped = {
        "image_id": "other_image_id", tables.PARTITION_COLUMN: "other_prefix",
        "other_image_id": "image_id", "other_prefix": tables.PARTITION_COLUMN,
    }  # fmt: skip
    return pa.table({name: pairs.column(swapped.get(name, name)) for name in pairs.schema.names}, schema=pairs.schema)


def _parsed_journal(stored: Versioned) -> _Journal | None:
    """The committed journal; None when there is none or it cannot be read (then the refresh reads everything)."""
    if stored.body is None:
        return None
    try:
        raw: Any = json.loads(stored.body.decode("utf-8"))
        if raw.get("format") != JOURNAL_FORMAT:
            return None
        fingerprints = {str(prefix): str(value) for prefix, value in raw["fingerprints"].items()}
        widths = {str(model_id): int(width) for model_id, width in raw["widths"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return _Journal(fingerprints, widths)


def _journal_body(journal: _Journal) -> bytes:
    document = {"format": JOURNAL_FORMAT, "fingerprints": journal.fingerprints, "widths": journal.widths}
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _width_of(
    model_id: str, read: Mapping[str, Mapping[str, PartitionVectors]], journal: _Journal | None
) -> int | None:
    for by_model in read.values():
        vectors = by_model.get(model_id)
        if vectors is not None and vectors.vectors.size:
            return int(vectors.vectors.shape[1])
    return journal.widths.get(model_id) if journal is not None else None


def _empty(prefix: str, fingerprint: str, width: int) -> PartitionVectors:
    return PartitionVectors(prefix, fingerprint, [], np.empty((0, width), np.float32))
