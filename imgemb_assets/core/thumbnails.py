"""The thumbnail rows of a partition: each manifest object downscaled to 224x224, or rejected with a reason.

A rewrite of a partition reuses what it already holds: an object whose image_id
(or uri, for a rejection) and etag are unchanged, made with the same recipe (the
decode settings and limits, `thumbnail_recipe`), keeps its stored thumbnail or
rejection without being downloaded or decoded; only new or changed objects are.
The partition is still written whole, in one commit.

The Dagster asset calls this and writes what it returns; keeping it here lets
tests and benchmarks run the step without Dagster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

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

# Bumped when the way a thumbnail is made changes, so that stored thumbnails are made again.
THUMBNAIL_RECIPE_VERSION: Final = 1
# ImageLimits fields that change no outcome (only how many decodes run at once).
_RECIPE_IGNORES: Final = frozenset({"max_decode_bytes"})


def thumbnail_recipe(limits: ImageLimits) -> str:
    """What a thumbnail or a content rejection depends on besides the object's bytes: the code's version and limits."""
    settings = {name: value for name, value in dataclasses.asdict(limits).items() if name not in _RECIPE_IGNORES}
    return f"v{THUMBNAIL_RECIPE_VERSION};" + ";".join(f"{name}={settings[name]}" for name in sorted(settings))


@dataclass(frozen=True)
class _Rejection:
    reason: str
    # The rejection follows from the object's bytes and the recipe alone, so it may be reused
    # while neither changes; False for storage refusals, deleted objects and duplicate ids.
    by_content: bool
    reused: bool = False  # kept from the stored partition, not decided by this write


@dataclass(frozen=True)
class StoredThumbnails:
    """A partition's stored outcomes that a rewrite may reuse: thumbnails by (image_id, etag), rejections by (uri, etag)."""

    thumbnails: dict[tuple[str, str], dict[str, Any]]
    rejections: dict[tuple[str, str], str]

    @classmethod
    def of(cls, images: pa.Table | None, rejected: pa.Table | None, recipe: str) -> StoredThumbnails:
        """The rows of the stored tables made with `recipe` (rows of other recipes, or none, are made again)."""
        thumbnails: dict[tuple[str, str], dict[str, Any]] = {}
        if images is not None and "decoded_with" in images.column_names:
            for row in images.to_pylist():
                if row["decoded_with"] == recipe:
                    thumbnails[(row["image_id"], row["etag"])] = row
        rejections: dict[tuple[str, str], str] = {}
        if rejected is not None and {"etag", "decoded_with"} <= set(rejected.column_names):
            for row in rejected.select(["uri", "etag", "reason", "decoded_with"]).to_pylist():
                if row["etag"] is not None and row["decoded_with"] == recipe:
                    rejections[(row["uri"], row["etag"])] = row["reason"]
        return cls(thumbnails, rejections)

    @classmethod
    def none(cls) -> StoredThumbnails:
        return cls({}, {})


@dataclass(frozen=True)
class DownscaledPartition:
    images: pa.Table  # DOWNSCALED_IMAGES_SCHEMA
    rejected: pa.Table  # REJECTED_IMAGES_SCHEMA
    decoded: int  # objects downloaded and decoded (or refused) by this write
    reused: int  # objects whose stored thumbnail or rejection was kept
    newly_rejected: frozenset[str] = frozenset()  # uris of the rejections decided by this write (not reused)


def downscale_partition(
    store: ObjectStore,
    manifest: pa.Table,
    limits: ImageLimits = ImageLimits(),
    max_workers: int | None = None,
    stored: StoredThumbnails | None = None,
    on_done: Callable[[int], None] | None = None,
) -> DownscaledPartition:
    """Every manifest row ends in exactly one of the two tables returned.

    `stored` outcomes are reused for unchanged objects; `on_done(n)` is called as objects are
    settled (for progress lines), from the decoding threads.
    """
    stored = stored or StoredThumbnails.none()
    recipe = thumbnail_recipe(limits)
    entries = manifest.to_pylist()
    outcomes: list[Thumbnail | _Rejection | dict[str, Any] | None] = [_stored_outcome(stored, e) for e in entries]
    to_decode = [index for index, outcome in enumerate(outcomes) if outcome is None]
    if on_done is not None and len(entries) > len(to_decode):
        on_done(len(entries) - len(to_decode))

    def settle(index: int) -> Thumbnail | _Rejection:
        outcome = _thumbnail_or_rejection(store, entries[index], limits, gate)
        if on_done is not None:
            on_done(1)
        return outcome

    with ThreadPoolExecutor(max_workers=max_workers) as pool:  # I/O and Pillow both release the GIL
        gate = DecodeGate(limits.max_decode_bytes)  # one memory budget for all the pool's decodes
        for index, outcome in zip(to_decode, pool.map(settle, to_decode)):
            outcomes[index] = outcome
    images: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    kept_uri_by_id: dict[str, str] = {}
    newly_rejected: set[str] = set()
    for entry, outcome in zip(entries, outcomes):
        if not isinstance(outcome, _Rejection) and entry["image_id"] in kept_uri_by_id:
            # Two files with one image_id would each join every sales row of that id.
            reason = f"duplicate image_id {entry['image_id']!r}: {kept_uri_by_id[entry['image_id']]} has the same name"
            outcome = _Rejection(reason, by_content=False)
        if isinstance(outcome, _Rejection):
            rejected.append(_rejected_row(entry, outcome, recipe))
            if not outcome.reused:
                newly_rejected.add(entry["uri"])
            continue
        kept_uri_by_id[entry["image_id"]] = entry["uri"]
        images.append(outcome if isinstance(outcome, dict) else _thumbnail_row(entry, outcome, recipe))
    return DownscaledPartition(
        images=pa.Table.from_pylist(images, schema=DOWNSCALED_IMAGES_SCHEMA),
        rejected=pa.Table.from_pylist(rejected, schema=REJECTED_IMAGES_SCHEMA),
        decoded=len(to_decode),
        reused=len(entries) - len(to_decode),
        newly_rejected=frozenset(newly_rejected),
    )


def _stored_outcome(stored: StoredThumbnails, entry: dict[str, Any]) -> dict[str, Any] | _Rejection | None:
    """The stored thumbnail row or rejection of an unchanged object, or None when it must be made."""
    if entry["image_id"] is not None:
        row = stored.thumbnails.get((entry["image_id"], entry["etag"]))
        if row is not None:
            return {**row, PARTITION_COLUMN: entry[PARTITION_COLUMN]}
    reason = stored.rejections.get((entry["uri"], entry["etag"]))
    return _Rejection(reason, by_content=True, reused=True) if reason is not None else None


def _thumbnail_row(entry: dict[str, Any], thumbnail: Thumbnail, recipe: str) -> dict[str, Any]:
    return {
        "image_id": entry["image_id"],
        PARTITION_COLUMN: entry[PARTITION_COLUMN],
        "etag": entry["etag"],
        "width": thumbnail.width,
        "height": thumbnail.height,
        "image_jpeg": thumbnail.jpeg,
        "decoded_with": recipe,
    }


def _rejected_row(entry: dict[str, Any], rejection: _Rejection, recipe: str) -> dict[str, Any]:
    reusable = rejection.by_content
    return {key: entry[key] for key in ("image_id", PARTITION_COLUMN, "uri")} | {
        "reason": rejection.reason,
        "etag": entry["etag"] if reusable else None,
        "decoded_with": recipe if reusable else None,
    }


def _thumbnail_or_rejection(
    store: ObjectStore, entry: dict[str, Any], limits: ImageLimits, gate: DecodeGate | None = None
) -> Thumbnail | _Rejection:
    # What the store refuses to read says more than the name (a link, a folder that cannot be listed).
    refusal = store.refusal(entry["uri"])
    if refusal is not None:
        return _Rejection(refusal, by_content=False)
    if entry["image_id"] is None:
        return _Rejection("object name has no extension, so no image_id can be derived from it", by_content=False)
    try:
        refuse_oversized_file(entry["size_bytes"], limits)
        data = store.read_bytes(entry["uri"])
        refuse_oversized_file(len(data), limits)  # the object may have grown since it was listed
        return downscale(data, limits.max_pixels, gate, full_size_jpeg_decode=limits.full_size_jpeg_decode)
    except ImageRejected as exc:
        return _Rejection(exc.reason, by_content=True)
    except ObjectRefused as exc:
        return _Rejection(str(exc), by_content=False)
    except ObjectMissing:
        return _Rejection(
            "object was deleted after it was listed; materialize the partition again to drop it from the manifest",
            by_content=False,
        )
