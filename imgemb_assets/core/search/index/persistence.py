"""Saving and loading a search index under the lake root, through pyarrow filesystems: a local root and an `s3://`
root work alike.

`<lake root>/_search_index/<model>/` holds `manifest.json` (what the index holds,
which files: `manifest.py`), the parquet segments of its vectors (`segments.py`) and
the graph. A save writes at most one new segment and the graph when it changed; a load
reads the manifest, each segment named once and the graph: a bounded number of files
however many partitions there are. `python -m bench.search_index --only persistence`
measured 10,000 partitions of 10 vectors of width 2048 on a local folder (2 cores): a
full save 2.0-2.6 s and 1 file (one file per partition: 18.8 s, 10,000 files), a load
2.1-2.7 s and 2 files (14.4 s, 10,001 files), a save after 10 partitions changed
0.06 s and 1 file (0.16 s, 10 written and 10 deleted); on the moto S3 server, 1,000
partitions: load 1.4 s against 15.9 s.

New files get new names and the manifest is written last, compare-and-swap
(`core/storage/conditional_write.py`), so a reader never sees a manifest naming a file
that is not complete and two writers never both commit from one load.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import pyarrow.fs as pafs
from usearch.index import Index as UsearchIndex

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.partition_values import partition_value
from imgemb_assets.core.search.index.errors import (
    IndexCommitConflict,
    IndexMissing,
    ModelMismatch,
    NamedFileMissing,
    SearchIndexError,
)
from imgemb_assets.core.search.index.graph import GRAPH_FOLDER, AnnGraph, AnnParameters
from imgemb_assets.core.search.index.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    check_manifest_shape,
    delete_orphans,
    delete_quietly,
    files_named,
    manifest_of,
    parsed_manifest,
    parsed_manifest_or_none,
    read_manifest,
    record_retired,
)
from imgemb_assets.core.search.index.search_index import SearchIndex
from imgemb_assets.core.search.index.segments import (
    SEGMENT_FOLDER,
    SegmentRows,
    indexed_partition,
    plan_segment,
    read_segment,
    write_segment,
)
from imgemb_assets.core.storage.arrow_filesystem import ArrowLocation, UnsupportedLocation, arrow_location
from imgemb_assets.core.storage.conditional_write import ConcurrentWrite, read_versioned, write_if_unchanged
from imgemb_assets.core.storage.names import local_path_of

INDEX_FOLDER: Final = "_search_index"
# A load that finds a named file gone re-reads the manifest (a save retired it past the grace
# meanwhile) at most this many times.
_LOAD_ATTEMPTS: Final = 3


@dataclass(frozen=True)
class SaveReport:
    files_written: int
    files_deleted: int
    bytes_written: int
    seconds: float


# --- where an index lives ------------------------------------------------------------


def index_folder_uri(lake: Lake, model_id: str) -> str:
    """Where the index of `model_id` lives: `<lake root>/_search_index/<safe model name>`."""
    return f"{_index_root_uri(lake)}/{_safe_name(model_id)}"


def _index_root_uri(lake: Lake) -> str:
    local = local_path_of(lake.root_uri)
    root = str(local.resolve()) if local is not None else lake.root_uri.rstrip("/")
    return f"{root}/{INDEX_FOLDER}"


def index_root(lake: Lake) -> ArrowLocation:
    """The folder holding every model's index folder (and the refresh journal), with a filesystem that reaches it."""
    return folder_at(_index_root_uri(lake), lake)


def _safe_name(model_id: str) -> str:
    # The lake's own rule for partition folders: readable when plain, stem and hash otherwise.
    return partition_value(model_id)


def _index_folder(lake: Lake, model_id: str) -> ArrowLocation:
    return folder_at(index_folder_uri(lake, model_id), lake)


def folder_at(uri: str, lake: Lake) -> ArrowLocation:
    """The folder at `uri` (the lake's index root or under it), with a filesystem that reaches it."""
    try:
        return arrow_location(uri, lake.current_storage_options())
    except UnsupportedLocation as exc:
        raise SearchIndexError(f"lake root {lake.root_uri!r}: only a local folder or s3:// is supported") from exc


# --- saving ------------------------------------------------------------------------


def save_index(index: SearchIndex, lake: Lake) -> SaveReport:
    """Write the index under the lake root: new files first, then the manifest (the commit), then clean up.

    At most one new segment (the partitions changed since the last save or load,
    or every live row when compacting) and the graph when it changed. The
    manifest is written only if it is still the one this index was loaded from
    (compare-and-swap, `core/storage/conditional_write.py`); an index not loaded from
    this folder replaces whatever manifest it finds there. When another writer
    saved in between, the save deletes its own new files and raises
    IndexCommitConflict: load again and redo the update.

    Files the new manifest no longer names are not deleted at once: the manifest
    lists them as retired, and a save deletes them once they have been retired
    for `RETIRED_GRACE_S`, so a reader that read the previous manifest still
    finds every file it names. The same save deletes orphans (files of a save
    that died before its manifest) older than the grace.
    """
    started = time.perf_counter()
    folder = _index_folder(lake, index.model_id)
    location = index_folder_uri(lake, index.model_id)
    loaded_here = index._stored_at == location
    if not loaded_here:
        # the segments it knows are in another folder (or none): this folder gets everything
        _forget_stored_files(index)
    stored = read_versioned(folder, MANIFEST_NAME)
    if loaded_here and stored.version != index._stored_version:
        raise IndexCommitConflict(_conflict_message(location))
    previous = parsed_manifest_or_none(stored.body)
    if folder.is_local:
        folder.filesystem.create_dir(folder.path, recursive=True)
    plan = plan_segment(index._partitions, index._segment_rows)
    new_files: list[str] = []
    bytes_written = 0
    segment_of = {prefix: partition.segment for prefix, partition in index._partitions.items()}
    segment_rows = dict(index._segment_rows)
    graph_file = index._ann.file if index._ann is not None else None
    try:
        if plan.prefixes:
            name = f"{SEGMENT_FOLDER}/{uuid.uuid4().hex}.parquet"
            new_files.append(name)
            bytes_written += write_segment(
                folder, name, [(prefix, index._partitions[prefix]) for prefix in plan.prefixes]
            )
            segment_of.update((prefix, name) for prefix in plan.prefixes)
            segment_rows[name] = plan.rows
        if index._ann is not None and graph_file is None:
            graph_file = f"{GRAPH_FOLDER}/{uuid.uuid4().hex}.usearch"
            new_files.append(graph_file)
            bytes_written += _write_graph_file(folder, graph_file, index._ann.graph)
        named = set(segment_of.values()) - {None}
        segment_rows = {name: rows for name, rows in segment_rows.items() if name in named}
        now = time.time()
        manifest = manifest_of(index, segment_of, segment_rows, graph_file)
        expired = record_retired(manifest, previous, now)
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode("utf-8")
        try:
            version = write_if_unchanged(folder, MANIFEST_NAME, body, stored.version)
        except ConcurrentWrite as conflict:
            raise IndexCommitConflict(_conflict_message(location)) from conflict
    except BaseException:
        # nothing names them: a failed or refused save leaves no file behind (a kill leaves orphans)
        delete_quietly(folder, new_files)
        raise
    # Stored: only now does the index take the names on (a failed write leaves it to write them again).
    for prefix, partition in index._partitions.items():
        partition.segment = segment_of[prefix]
    if index._ann is not None:
        index._ann.file = graph_file
    index._segment_rows = segment_rows
    index._stored_at = location
    index._stored_version = version
    deleted = delete_quietly(folder, expired)
    deleted += delete_orphans(folder, set(files_named(manifest)) | set(manifest["retired"]), now)
    return SaveReport(len(new_files), deleted, bytes_written, time.perf_counter() - started)


def _conflict_message(location: str) -> str:
    return f"the search index at {location} was saved by another writer since this one loaded it; load it again"


def _forget_stored_files(index: SearchIndex) -> None:
    for partition in index._partitions.values():
        partition.segment = None
    if index._ann is not None:
        index._ann.file = None
    index._segment_rows = {}


# --- loading -----------------------------------------------------------------------


def load_index(lake: Lake, model_id: str, width: int | None = None) -> SearchIndex:
    """The index of `model_id` saved under the lake root; IndexMissing when there is none.

    Reads the manifest, each segment it names once, and the graph: a bounded
    number of files however many partitions there are. Damage (a manifest or a
    file that cannot be read as what it should be) is a SearchIndexError that
    names the file; a named file that is gone is looked for again under a newer
    manifest, in case a save retired it meanwhile.
    """
    folder = _index_folder(lake, model_id)
    location = index_folder_uri(lake, model_id)
    for attempt in range(_LOAD_ATTEMPTS):
        stored = read_versioned(folder, MANIFEST_NAME)
        if stored.body is None:
            raise IndexMissing(f"no search index for model {model_id!r} at {location}")
        manifest = parsed_manifest(stored.body, folder.file(MANIFEST_NAME))
        try:
            index = _index_from_manifest(folder, location, manifest, model_id, width)
        except NamedFileMissing as missing:
            if attempt + 1 < _LOAD_ATTEMPTS and read_versioned(folder, MANIFEST_NAME).version != stored.version:
                continue
            raise SearchIndexError(
                f"{folder.file(missing.name)}, named by {folder.file(MANIFEST_NAME)}, is missing"
            ) from missing
        index._stored_version = stored.version
        return index
    raise AssertionError("unreachable: the last attempt returns or raises")


def _index_from_manifest(
    folder: ArrowLocation, location: str, manifest: Mapping[str, Any], model_id: str, width: int | None
) -> SearchIndex:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SearchIndexError(
            f"search index format {manifest.get('format_version')!r} at {location}; "
            f"this code reads {FORMAT_VERSION}: build it again"
        )
    check_manifest_shape(manifest, folder.file(MANIFEST_NAME))
    if manifest["model_id"] != model_id or (width is not None and manifest["width"] != width):
        raise ModelMismatch(
            f"the index at {location} holds {manifest['model_id']!r} vectors of width "
            f"{manifest['width']}, not {model_id!r}" + (f" of width {width}" if width is not None else "")
        )
    ann = manifest["ann"]
    index = SearchIndex(model_id, manifest["width"], manifest["ann_threshold"], AnnParameters(**ann["parameters"]))
    index.build_seconds = manifest["build_seconds"]
    index._next_key = manifest["next_key"]
    entries: dict[str, dict[str, Any]] = manifest["partitions"]
    segment_rows: dict[str, int] = manifest["segments"]
    wanted: dict[str, set[str]] = {}
    for prefix, entry in entries.items():
        if entry["segment"] is not None:
            if entry["segment"] not in segment_rows:
                raise SearchIndexError(f"the manifest at {location} maps {prefix!r} to a segment it does not list")
            wanted.setdefault(entry["segment"], set()).add(prefix)
    rows: dict[str, SegmentRows] = {}
    for name in sorted(wanted):
        rows.update(read_segment(folder, name, index.width, wanted[name]))
    for prefix, entry in sorted(entries.items()):
        partition = indexed_partition(rows.pop(prefix, None), index.width, entry["fingerprint"], entry["segment"])
        if len(partition.keys) != entry["count"]:
            raise SearchIndexError(
                f"{folder.file(str(entry['segment']))} holds {len(partition.keys)} vectors of {prefix!r}, "
                f"the manifest says {entry['count']}"
            )
        index._remember(prefix, partition)
    if ann["file"] is not None:
        index._ann = AnnGraph(_read_graph_file(folder, ann["file"]), ann["removed_since_build"], ann["file"])
    index._segment_rows = dict(segment_rows)
    index._stored_at = location
    return index


def stored_index_bytes(lake: Lake, model_id: str) -> int:
    """Bytes of the saved index's files (manifest included); 0 when there is none."""
    folder = _index_folder(lake, model_id)
    manifest = read_manifest(folder)
    if manifest is None:
        return 0
    names = [MANIFEST_NAME, *files_named(manifest)]
    infos = folder.filesystem.get_file_info([folder.file(name) for name in names])
    return sum(info.size or 0 for info in infos)


# --- the graph's file ------------------------------------------------------------------


def _write_graph_file(folder: ArrowLocation, name: str, graph: UsearchIndex) -> int:
    # usearch writes to a local path; the copy goes wherever the folder is
    with tempfile.TemporaryDirectory(prefix="imgemb-index-") as scratch:
        local = os.path.join(scratch, "graph.usearch")
        graph.save(local)
        if folder.is_local:
            folder.filesystem.create_dir(folder.file(name.rsplit("/", 1)[0]), recursive=True)
        pafs.copy_files(local, folder.file(name), pafs.LocalFileSystem(), folder.filesystem)
        return os.path.getsize(local)


def _read_graph_file(folder: ArrowLocation, name: str) -> UsearchIndex:
    with tempfile.TemporaryDirectory(prefix="imgemb-index-") as scratch:
        local = os.path.join(scratch, "graph.usearch")
        try:
            pafs.copy_files(folder.file(name), local, folder.filesystem, pafs.LocalFileSystem())
        except FileNotFoundError as missing:
            raise NamedFileMissing(name) from missing
        try:
            graph = UsearchIndex.restore(local)  # loads into memory; the file can go
        except (ValueError, RuntimeError) as damaged:
            raise SearchIndexError(f"{folder.file(name)} is not a readable usearch index: {damaged}") from damaged
    if graph is None:
        raise SearchIndexError(f"{folder.file(name)} is not a usearch index")
    return graph
