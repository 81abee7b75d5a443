"""The indexes stored under a lake root, read from each index folder's manifest: the models with an index
(`stored_indexes`, `stored_model_ids`), the folders whose manifest cannot be read, and setting such a folder aside
(`set_damaged_index_aside`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index.errors import SearchIndexError
from imgemb_assets.core.search.index.manifest import MANIFEST_NAME, read_manifest
from imgemb_assets.core.search.index.persistence import folder_at, index_root
from imgemb_assets.core.storage.arrow_filesystem import ArrowLocation


@dataclass(frozen=True)
class StoredIndexes:
    """What the index folders under a lake root hold."""

    model_ids: list[str]  # sorted: the models whose folder holds a readable manifest
    damaged: dict[str, str]  # folder uri -> why its manifest cannot be read


def stored_indexes(lake: Lake) -> StoredIndexes:
    """Every index folder under the lake root: its model_id from its manifest, or why that cannot be read.

    Read from each folder's manifest: folder names are lossy (a long or odd
    model_id becomes a stem and a hash). A folder without a manifest (a save
    that never finished its first manifest) holds no index; an index of another
    format is listed (`load_index` refuses it, and the caller builds it again).
    """
    root = index_root(lake)
    listed = root.filesystem.get_file_info(pafs.FileSelector(root.path, allow_not_found=True, recursive=False))
    model_ids: set[str] = set()
    damaged: dict[str, str] = {}
    for info in listed:
        if info.type != pafs.FileType.Directory:
            continue
        try:
            manifest = read_manifest(ArrowLocation(root.filesystem, info.path, root.is_local, root.storage_options))
        except SearchIndexError as exc:
            damaged[_uri_of(root, info.path)] = str(exc)
            continue
        if manifest is None:
            continue
        if isinstance(manifest.get("model_id"), str):
            model_ids.add(manifest["model_id"])
        else:
            damaged[_uri_of(root, info.path)] = f"{info.path}/{MANIFEST_NAME} names no model_id"
    return StoredIndexes(sorted(model_ids), damaged)


def stored_model_ids(lake: Lake) -> list[str]:
    """The model_ids with a readable index manifest under the lake root, sorted; empty when there is none."""
    return stored_indexes(lake).model_ids


def set_damaged_index_aside(lake: Lake, folder_uri: str) -> str:
    """Rename the damaged manifest of an index folder that no model claims, so it is no longer an index; its new name."""
    folder = folder_at(folder_uri, lake)
    aside = f"{MANIFEST_NAME}.damaged-{int(time.time())}"
    folder.filesystem.move(folder.file(MANIFEST_NAME), folder.file(aside))
    return folder.file(aside)


def _uri_of(root: ArrowLocation, path: str) -> str:
    return path if root.is_local else f"s3://{path}"
