"""The thumbnail rows of a partition: each manifest object downscaled to 224x224, or rejected with a reason.

The Dagster asset calls this and writes what it returns; keeping it here lets
tests and benchmarks run the step without Dagster.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from imgemb_assets.core.images import (
    DecodeGate,
    ImageLimits,
    ImageRejected,
    Thumbnail,
    downscale,
    refuse_oversized_file,
)
from imgemb_assets.core.storage import ObjectMissing, ObjectRefused, ObjectStore
from imgemb_assets.core.tables import DOWNSCALED_IMAGES_SCHEMA, PARTITION_COLUMN, REJECTED_IMAGES_SCHEMA


@dataclass(frozen=True)
class DownscaledPartition:
    images: pa.Table  # DOWNSCALED_IMAGES_SCHEMA
    rejected: pa.Table  # REJECTED_IMAGES_SCHEMA


def downscale_partition(
    store: ObjectStore, manifest: pa.Table, limits: ImageLimits = ImageLimits(), max_workers: int | None = None
) -> DownscaledPartition:
    """Every manifest row ends in exactly one of the two tables returned."""
    entries = manifest.to_pylist()
    with ThreadPoolExecutor(max_workers=max_workers) as pool:  # I/O and Pillow both release the GIL
        gate = DecodeGate(limits.max_decode_bytes)  # one memory budget for all the pool's decodes
        outcomes = list(pool.map(lambda entry: _thumbnail_or_reason(store, entry, limits, gate), entries))
    images: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    kept_uri_by_id: dict[str, str] = {}
    for entry, outcome in zip(entries, outcomes):
        if isinstance(outcome, Thumbnail) and entry["image_id"] in kept_uri_by_id:
            # Two files with one image_id would each join every sales row of that id.
            outcome = f"duplicate image_id {entry['image_id']!r}: {kept_uri_by_id[entry['image_id']]} has the same name"
        if isinstance(outcome, str):
            rejected.append({key: entry[key] for key in ("image_id", PARTITION_COLUMN, "uri")} | {"reason": outcome})
            continue
        kept_uri_by_id[entry["image_id"]] = entry["uri"]
        images.append(
            {
                "image_id": entry["image_id"],
                PARTITION_COLUMN: entry[PARTITION_COLUMN],
                "etag": entry["etag"],
                "width": outcome.width,
                "height": outcome.height,
                "image_jpeg": outcome.jpeg,
            }
        )
    return DownscaledPartition(
        images=pa.Table.from_pylist(images, schema=DOWNSCALED_IMAGES_SCHEMA),
        rejected=pa.Table.from_pylist(rejected, schema=REJECTED_IMAGES_SCHEMA),
    )


def _thumbnail_or_reason(
    store: ObjectStore, entry: dict[str, Any], limits: ImageLimits, gate: DecodeGate | None = None
) -> Thumbnail | str:
    # What the store refuses to read says more than the name (a link, a folder that cannot be listed).
    refusal = store.refusal(entry["uri"])
    if refusal is not None:
        return refusal
    if entry["image_id"] is None:
        return "object name has no extension, so no image_id can be derived from it"
    try:
        refuse_oversized_file(entry["size_bytes"], limits)
        data = store.read_bytes(entry["uri"])
        refuse_oversized_file(len(data), limits)  # the object may have grown since it was listed
        return downscale(data, limits.max_pixels, gate)
    except ImageRejected as exc:
        return exc.reason
    except ObjectRefused as exc:
        return str(exc)
    except ObjectMissing:
        return "object was deleted after it was listed; materialize the partition again to drop it from the manifest"
