"""Parquet segments of a saved index's vectors: which partitions a save's one new segment holds (compaction), writing
it in row groups of whole partitions, and reading back the rows of the prefixes the manifest maps to it.

Catalogues reach 10,000 partitions of a few to a few hundred images, so the
vectors are not kept one file per partition (10,000 GETs a load, thousands of
PUTs a backfill): each save writes at most one segment, holding the rows of
every partition changed since the last save or load. Older versions of a prefix
stay in older segments until those are compacted: when fewer than half the rows
of the named segments would be live, or there would be more than
`_MAX_SEGMENTS`, the save writes all live rows into one segment instead; so a
load reads at most twice the live rows, from at most 32 segments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgemb_assets.core.search.index.errors import NamedFileMissing, SearchIndexError
from imgemb_assets.core.search.index.partitions import IndexedPartition
from imgemb_assets.core.storage.arrow_filesystem import ArrowLocation

# The folder of a saved index's segments, under the index folder.
SEGMENT_FOLDER: Final = "segments"
# Compaction (see the module docstring): a save rewrites every live row into one segment
# when the named segments would number more than this, or hold fewer live rows than
# this fraction of their rows. Both bound what a load reads: files, and wasted bytes.
_MAX_SEGMENTS: Final = 32
_COMPACT_BELOW_LIVE_FRACTION: Final = 0.5
# Rows of a segment are written in parquet row groups of about this many bytes of vectors
# (whole partitions each), so neither a save nor a load holds a second copy of every vector.
_SEGMENT_ROW_GROUP_BYTES: Final = 32 * 2**20
_SEGMENT_COLUMNS: Final = ("prefix", "key", "image_id", "vector")


@dataclass(frozen=True)
class SegmentPlan:
    prefixes: tuple[str, ...]  # the partitions whose rows the new segment holds; empty: no new segment
    rows: int
    compacting: bool


def plan_segment(partitions: Mapping[str, IndexedPartition], segment_rows: Mapping[str, int]) -> SegmentPlan:
    """What the save's one new segment holds: the changed partitions, or every live row (compaction).

    `segment_rows`: every row (live or not) of each segment the stored manifest names.
    """
    stored = [(prefix, partition) for prefix, partition in sorted(partitions.items()) if len(partition.keys)]
    changed = [prefix for prefix, partition in stored if partition.segment is None]
    changed_rows = sum(len(partitions[prefix].keys) for prefix in changed)
    live: Counter[str] = Counter()
    for _, partition in stored:
        if partition.segment is not None:
            live[partition.segment] += len(partition.keys)
    # weighed over the segments the new manifest would name, the new one (all live) included
    segments = len(live) + (1 if changed else 0)
    live_rows = sum(live.values()) + changed_rows
    total_rows = sum(segment_rows.get(name, rows) for name, rows in live.items()) + changed_rows
    if segments > _MAX_SEGMENTS or live_rows < _COMPACT_BELOW_LIVE_FRACTION * total_rows:
        return SegmentPlan(tuple(prefix for prefix, _ in stored), live_rows, True)
    return SegmentPlan(tuple(changed), changed_rows, False)


def _segment_schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            ("prefix", pa.string()),
            ("key", pa.uint64()),
            ("image_id", pa.string()),
            ("vector", pa.list_(pa.float32(), width)),
        ]
    )


def write_segment(folder: ArrowLocation, name: str, partitions: Sequence[tuple[str, IndexedPartition]]) -> int:
    """One parquet file of these partitions' rows, a row group per few partitions; the bytes written."""
    width = partitions[0][1].vectors.shape[1]
    if folder.is_local:
        folder.filesystem.create_dir(folder.file(name.rsplit("/", 1)[0]), recursive=True)
    with folder.filesystem.open_output_stream(folder.file(name)) as stream:
        # normalised float32 hardly compresses: no codec, and no statistics nobody reads, keep writing
        # fast; the prefix column, a few values repeated, is dictionary-encoded
        with pq.ParquetWriter(
            stream, _segment_schema(width), compression="none", use_dictionary=["prefix"], write_statistics=False
        ) as writer:
            for group in _row_groups(partitions, max(1, _SEGMENT_ROW_GROUP_BYTES // (4 * width))):
                writer.write_table(_segment_table(group, width), row_group_size=None)
        return stream.tell()


def _row_groups(
    partitions: Sequence[tuple[str, IndexedPartition]], rows_per_group: int
) -> Iterable[list[tuple[str, IndexedPartition]]]:
    # whole partitions per group: a partition larger than a group gets one to itself
    group: list[tuple[str, IndexedPartition]] = []
    rows = 0
    for prefix, partition in partitions:
        if group and rows + len(partition.keys) > rows_per_group:
            yield group
            group, rows = [], 0
        group.append((prefix, partition))
        rows += len(partition.keys)
    if group:
        yield group


def _segment_table(group: Sequence[tuple[str, IndexedPartition]], width: int) -> pa.Table:
    flat = pa.array(np.concatenate([partition.vectors for _, partition in group]).reshape(-1), pa.float32())
    return pa.table(
        {
            "prefix": pa.array(
                [prefix for prefix, partition in group for _ in range(len(partition.keys))], pa.string()
            ),
            "key": pa.array(np.concatenate([partition.keys for _, partition in group]), pa.uint64()),
            "image_id": pa.array([image_id for _, partition in group for image_id in partition.image_ids], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, width),
        },
        schema=_segment_schema(width),
    )


@dataclass
class SegmentRows:
    """One partition's rows as read from a segment, in pieces (one per row group that held some)."""

    keys: list[np.ndarray]
    image_ids: list[str]
    vectors: list[np.ndarray]


def read_segment(folder: ArrowLocation, name: str, width: int, prefixes: set[str]) -> dict[str, SegmentRows]:
    """The rows of `prefixes` in one segment; rows of other prefixes (replaced since) are skipped."""
    found: dict[str, SegmentRows] = {}
    try:
        with folder.filesystem.open_input_file(folder.file(name)) as source:
            # pre_buffer: one coalesced read per row group, not one per column (a GET each on S3)
            parquet = pq.ParquetFile(source, pre_buffer=True)
            columns = parquet.schema_arrow.names
            if list(columns) != list(_SEGMENT_COLUMNS):
                raise SearchIndexError(f"{folder.file(name)} has columns {columns}, expected {list(_SEGMENT_COLUMNS)}")
            for group in range(parquet.num_row_groups):
                _take_rows(parquet.read_row_group(group), width, prefixes, found)
    except FileNotFoundError as missing:
        raise NamedFileMissing(name) from missing
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as damaged:  # truncated, empty, not parquet, wrong width
        raise SearchIndexError(f"{folder.file(name)} is not a readable index segment: {damaged}") from damaged
    return found


def _take_rows(table: pa.Table, width: int, prefixes: set[str], found: dict[str, SegmentRows]) -> None:
    encoded = pc.dictionary_encode(table.column("prefix").combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    # rows grouped by prefix, each group in the order written (a stable sort)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if len(order) else np.empty(0, int)
    ends = np.r_[starts[1:], len(order)]
    keys = table.column("key").to_numpy().astype(np.uint64, copy=False)
    image_ids = table.column("image_id").to_pylist()
    column = table.column("vector").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    for start, end in zip(starts.tolist(), ends.tolist()):
        prefix = names[sorted_codes[start]]
        if prefix not in prefixes:
            continue
        rows = order[start:end]
        # fancy indexing copies: nothing keeps the row group's buffers alive
        piece = found.setdefault(prefix, SegmentRows([], [], []))
        piece.keys.append(keys[rows])
        piece.image_ids.extend(image_ids[row] for row in rows.tolist())
        piece.vectors.append(vectors[rows].astype(np.float32, copy=False))


def indexed_partition(rows: SegmentRows | None, width: int, fingerprint: str, segment: str | None) -> IndexedPartition:
    """A partition as read from its segment (`rows`), or with no vectors (None)."""
    if rows is None:
        return IndexedPartition(fingerprint, np.empty(0, np.uint64), [], np.empty((0, width), np.float32), {}, segment)
    vectors = rows.vectors[0] if len(rows.vectors) == 1 else np.concatenate(rows.vectors)
    keys = rows.keys[0] if len(rows.keys) == 1 else np.concatenate(rows.keys)
    row_of_id = {image_id: row for row, image_id in enumerate(rows.image_ids)}
    return IndexedPartition(fingerprint, keys, rows.image_ids, np.ascontiguousarray(vectors), row_of_id, segment)
