"""A saved index's `manifest.json`: what it records (`manifest_of`), the checks a load makes of its shape, the data
files it names, and the files it retires.

The manifest maps each prefix to (segment, count, fingerprint); a partition with no
vectors of the model has no segment, only its fingerprint. The files a manifest stops
naming are retired (listed in it) and deleted by a later save after `RETIRED_GRACE_S`,
so a reader of the previous manifest still finds them; the same save deletes orphans
(files of a save that died before its manifest) older than the grace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any, Final

import pyarrow.fs as pafs

from imgemb_assets.core.search.index.errors import SearchIndexError
from imgemb_assets.core.search.index.graph import ANN_LIBRARY, GRAPH_FOLDER, usearch_version
from imgemb_assets.core.search.index.search_index import SearchIndex
from imgemb_assets.core.search.index.segments import SEGMENT_FOLDER
from imgemb_assets.core.storage.arrow_filesystem import ArrowLocation
from imgemb_assets.core.storage.conditional_write import read_versioned

MANIFEST_NAME: Final = "manifest.json"
# 2: segments holding many partitions (1: one parquet file per partition).
FORMAT_VERSION: Final = 2
# How long a file the manifest stopped naming (and an orphan) is kept before a save deletes it:
# a reader that read the previous manifest has this long to read the files it names.
RETIRED_GRACE_S: float = 3600.0
# The manifest's keys a load reads, with their types (partition entries are checked one by one).
_MANIFEST_KEYS: Final[dict[str, type | tuple[type, ...]]] = {
    "model_id": str, "width": int, "next_key": int, "ann_threshold": int, "build_seconds": (int, float),
    "ann": dict, "segments": dict, "partitions": dict,
}  # fmt: skip


def check_manifest_shape(manifest: Mapping[str, Any], file: str) -> None:
    """SearchIndexError naming the file for a manifest whose keys a load reads are missing or of the wrong type."""
    problems = [key for key, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    ann = manifest.get("ann")
    if isinstance(ann, dict) and not (
        isinstance(ann.get("parameters"), dict) and "file" in ann and "removed_since_build" in ann
    ):
        problems.append("ann")
    partitions = manifest.get("partitions")
    if isinstance(partitions, dict) and not all(
        isinstance(entry, dict) and {"segment", "count", "fingerprint"} <= entry.keys() for entry in partitions.values()
    ):
        problems.append("partitions")
    if problems:
        raise SearchIndexError(
            f"{file} is not a readable manifest: {', '.join(sorted(set(problems)))} missing or malformed"
        )


def manifest_of(
    index: SearchIndex, segment_of: Mapping[str, str | None], segment_rows: Mapping[str, int], graph_file: str | None
) -> dict[str, Any]:
    ann = index._ann
    return {
        "format_version": FORMAT_VERSION,
        "model_id": index.model_id,
        "width": index.width,
        "metric": "cosine",
        "vectors": len(index),
        "next_key": index._next_key,
        "ann_threshold": index.ann_threshold,
        "build_seconds": index.build_seconds,
        "backend": index.backend,
        "ann": {
            "library": ANN_LIBRARY,
            "library_version": usearch_version(),
            "parameters": asdict(index.ann_parameters),
            "file": graph_file,
            "removed_since_build": ann.removed_since_build if ann is not None else 0,
        },
        # every row each segment holds, live or not: what compaction weighs
        "segments": dict(sorted(segment_rows.items())),
        "partitions": {
            prefix: {"segment": segment_of[prefix], "count": len(p.keys), "fingerprint": p.fingerprint}
            for prefix, p in sorted(index._partitions.items())
        },
    }


def files_named(manifest: Mapping[str, Any] | None) -> list[str]:
    """The data files a manifest names; of format 1 too, so a rebuild's save deletes an old layout's files."""
    if manifest is None:
        return []
    version = manifest.get("format_version")
    if version == 1:
        names = [entry["file"] for entry in manifest["partitions"]]
    elif version == FORMAT_VERSION:
        names = list(manifest["segments"])
    else:
        return []  # a layout this code does not know: leave its files alone
    if manifest["ann"]["file"] is not None:
        names.append(manifest["ann"]["file"])
    return names


def read_manifest(folder: ArrowLocation) -> dict[str, Any] | None:
    body = read_versioned(folder, MANIFEST_NAME).body
    return None if body is None else parsed_manifest(body, folder.file(MANIFEST_NAME))


def parsed_manifest(body: bytes, file: str) -> dict[str, Any]:
    try:
        manifest = json.loads(body.decode("utf-8"))
    except ValueError as error:
        raise SearchIndexError(f"{file} is not a readable manifest: {error}") from error
    if not isinstance(manifest, dict):
        raise SearchIndexError(f"{file} is not a readable manifest: not a JSON object")
    return manifest


def parsed_manifest_or_none(body: bytes | None) -> dict[str, Any] | None:
    """A manifest being replaced: unreadable (damaged) is as good as none, its files become orphans."""
    if body is None:
        return None
    try:
        manifest = parsed_manifest(body, MANIFEST_NAME)
        files_named(manifest)
    except (SearchIndexError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def record_retired(manifest: dict[str, Any], previous: Mapping[str, Any] | None, now: float) -> list[str]:
    """List in `manifest` the files retired within the grace; those retired longer, to delete once it is committed."""
    retired = _retired_after(previous, set(files_named(manifest)), now)
    expired = sorted(name for name, at in retired.items() if now - at >= RETIRED_GRACE_S)
    manifest["retired"] = {name: at for name, at in sorted(retired.items()) if name not in expired}
    return expired


def _retired_after(previous: Mapping[str, Any] | None, still_named: set[str], now: float) -> dict[str, float]:
    """The previous manifest's retired files, with the files it named that the new manifest does not."""
    retired: dict[str, float] = {}
    if previous is not None:
        retired.update((name, float(at)) for name, at in dict(previous.get("retired") or {}).items())
        retired.update((name, now) for name in files_named(previous) if name not in retired)
    return {name: at for name, at in retired.items() if name not in still_named}


def delete_quietly(folder: ArrowLocation, names: Iterable[str]) -> int:
    """Delete what it can; a file left behind is an orphan a later save deletes. How many were deleted."""
    deleted = 0
    for name in names:
        try:
            folder.filesystem.delete_file(folder.file(name))
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError:
            continue
    return deleted


def delete_orphans(folder: ArrowLocation, kept: set[str], now: float) -> int:
    """Delete the data files (and local scratch manifests) nothing names, once older than the grace.

    They come from saves that died between writing their files and their
    manifest. The age spares the files of a save still under way.
    """
    listed: list[pafs.FileInfo] = []
    for sub in (SEGMENT_FOLDER, GRAPH_FOLDER):
        listed += folder.filesystem.get_file_info(pafs.FileSelector(folder.file(sub), allow_not_found=True))
    if folder.is_local:
        top = folder.filesystem.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
        listed += [
            info
            for info in top
            if info.base_name.startswith(f".{MANIFEST_NAME}.") and not info.base_name.endswith(".lock")
        ]
    orphans = []
    for info in listed:
        if info.type != pafs.FileType.File:
            continue
        name = info.path[len(folder.path) + 1 :]
        modified = info.mtime.timestamp() if info.mtime is not None else now
        if name not in kept and now - modified >= RETIRED_GRACE_S:
            orphans.append(name)
    return delete_quietly(folder, orphans)
