"""The manifest rows of a partition: one per object listed under its prefix."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from imgemb_assets.core.imaging.images import image_id_from_key
from imgemb_assets.core.lake.tables import PARTITION_COLUMN, RAW_IMAGE_MANIFEST_SCHEMA
from imgemb_assets.core.storage.objects import ObjectInfo


def build_manifest(objects: Iterable[ObjectInfo], prefix: str) -> pa.Table:
    """One row per object listed under the prefix."""
    rows = [
        {
            "image_id": image_id_from_key(obj.key),
            PARTITION_COLUMN: prefix,
            "uri": obj.uri,
            "size_bytes": obj.size_bytes,
            "etag": obj.etag,
            "last_modified": obj.last_modified,
        }
        for obj in objects
    ]
    return pa.Table.from_pylist(rows, schema=RAW_IMAGE_MANIFEST_SCHEMA)
