"""The thumbnail rows of a partition: each manifest object downscaled to 224x224, or rejected with a reason.

A rewrite of a partition reuses what it already holds: an object whose image_id
(or uri, for a rejection) and etag are unchanged, made with the same recipe (the
decode settings and limits, `thumbnail_recipe`), keeps its stored thumbnail or
rejection without being downloaded or decoded; only new or changed objects are.
The partition is still written whole, in one commit.

The partition is produced as a stream of batches (`downscale_partition_stream`), written
to Delta as it comes: memory holds the manifest and one batch of objects, not the
partition's thumbnails. The Dagster asset calls this and writes what it returns; keeping
it here lets tests and benchmarks run the step without Dagster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, ParamSpec

import pyarrow as pa

from imgemb_assets.core.imaging.images import (
    DecodeGate,
    ImageLimits,
    ImageRejected,
    Thumbnail,
    downscale,
    refuse_oversized_file,
)
from imgemb_assets.core.lake.tables import DOWNSCALED_IMAGES_SCHEMA, PARTITION_COLUMN, REJECTED_IMAGES_SCHEMA
from imgemb_assets.core.storage.errors import ObjectMissing, ObjectRefused
from imgemb_assets.core.storage.objects import ObjectStore

_StreamArgs = ParamSpec("_StreamArgs")

# Bumped when the way a thumbnail is made changes, so that stored thumbnails are made again.
THUMBNAIL_RECIPE_VERSION: Final = 1
# ImageLimits fields that change no outcome (only how many decodes run at once).
_RECIPE_IGNORES: Final = frozenset({"max_decode_bytes"})
# Objects read and decoded per batch of a streamed partition: enough to keep the pool busy, few
# enough that a batch's thumbnails (about 10 KB each) and source bytes stay a few MB.
_OBJECTS_PER_BATCH: Final = 256
# Stored thumbnail rows per batch when a rewrite streams the reused ones (about 10 KB each).
STORED_BATCH_ROWS: Final = 512


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
    """A partition's stored outcomes that a rewrite may reuse: thumbnails by (image_id, etag), rejections by (uri, etag).

    Only the thumbnails' keys are held; their rows (JPEG bytes) are streamed from `rows()`
    when the reused ones are written again, so memory does not grow with the partition.
    """

    thumbnail_keys: frozenset[tuple[str, str]]
    rejections: dict[tuple[str, str], str]
    rows: Callable[[], Iterable[pa.RecordBatch]] = field(default=lambda: iter(()))

    @classmethod
    def of(cls, images: pa.Table | None, rejected: pa.Table | None, recipe: str) -> StoredThumbnails:
        """The rows of the stored tables made with `recipe` (rows of other recipes, or none, are made again)."""
        if images is None:
            return cls.streamed(None, lambda: iter(()), rejected, recipe)
        return cls.streamed(images, lambda: iter(images.to_batches(max_chunksize=STORED_BATCH_ROWS)), rejected, recipe)

    @classmethod
    def streamed(
        cls,
        keys: pa.Table | None,
        rows: Callable[[], Iterable[pa.RecordBatch]],
        rejected: pa.Table | None,
        recipe: str,
    ) -> StoredThumbnails:
        """`keys`: the stored thumbnails' image_id, etag and decoded_with columns; `rows()`: all their rows, streamed."""
        thumbnail_keys: set[tuple[str, str]] = set()
        if keys is not None and "decoded_with" in keys.column_names:
            for row in keys.select(["image_id", "etag", "decoded_with"]).to_pylist():
                if row["decoded_with"] == recipe:
                    thumbnail_keys.add((row["image_id"], row["etag"]))
        rejections: dict[tuple[str, str], str] = {}
        if rejected is not None and {"etag", "decoded_with"} <= set(rejected.column_names):
            for row in rejected.select(["uri", "etag", "reason", "decoded_with"]).to_pylist():
                if row["etag"] is not None and row["decoded_with"] == recipe:
                    rejections[(row["uri"], row["etag"])] = row["reason"]
        return cls(frozenset(thumbnail_keys), rejections, rows if thumbnail_keys else lambda: iter(()))

    @classmethod
    def none(cls) -> StoredThumbnails:
        return cls(frozenset(), {})


@dataclass
class DownscaleTally:
    """What a streamed downscale settled besides its thumbnail rows; complete once the stream is consumed."""

    decoded: int = 0  # objects downloaded and decoded (or refused) by this write
    reused: int = 0  # objects whose stored thumbnail or rejection was kept
    rejected_rows: list[dict[str, Any]] = field(default_factory=list)  # small: no image bytes
    newly_rejected: set[str] = field(default_factory=set)  # uris of the rejections decided by this write

    def rejected(self) -> pa.Table:
        return pa.Table.from_pylist(self.rejected_rows, schema=REJECTED_IMAGES_SCHEMA)


@dataclass(frozen=True)
class DownscaledPartition:
    images: pa.Table  # DOWNSCALED_IMAGES_SCHEMA
    rejected: pa.Table  # REJECTED_IMAGES_SCHEMA
    decoded: int  # objects downloaded and decoded (or refused) by this write
    reused: int  # objects whose stored thumbnail or rejection was kept
    newly_rejected: frozenset[str] = frozenset()  # uris of the rejections decided by this write (not reused)


def downscale_partition_stream(
    store: ObjectStore,
    manifest: pa.Table,
    limits: ImageLimits = ImageLimits(),
    max_workers: int | None = None,
    stored: StoredThumbnails | None = None,
    on_done: Callable[[int], None] | None = None,
    objects_per_batch: int = _OBJECTS_PER_BATCH,
) -> tuple[Iterator[pa.RecordBatch], DownscaleTally]:
    """The partition's thumbnail rows as a stream of batches, and the tally the stream fills (rejections included).

    Every manifest row ends in exactly one thumbnail row or one rejection. Memory holds the
    manifest, the stored keys and one batch of objects, whatever the partition's size: the
    reused thumbnails are streamed from `stored.rows()` first, then new or changed objects
    are read and decoded `objects_per_batch` at a time. Of two objects with one image_id,
    the first kept (reused ones first, then in manifest order) stays and the other is rejected.
    `on_done(n)` is called as objects are settled (for progress lines), from the decoding threads.
    """
    stored = stored or StoredThumbnails.none()
    tally = DownscaleTally()
    return _thumbnail_batches(store, manifest, limits, max_workers, stored, on_done, objects_per_batch, tally), tally


def _whole_partition(
    stream: Callable[_StreamArgs, tuple[Iterator[pa.RecordBatch], DownscaleTally]],
) -> Callable[_StreamArgs, DownscaledPartition]:
    """`stream` with its batches gathered into one table: the same arguments, the whole partition in memory."""

    def whole(*args: _StreamArgs.args, **kwargs: _StreamArgs.kwargs) -> DownscaledPartition:
        batches, tally = stream(*args, **kwargs)
        images = pa.Table.from_batches(list(batches), schema=DOWNSCALED_IMAGES_SCHEMA)
        return DownscaledPartition(
            images=images,
            rejected=tally.rejected(),
            decoded=tally.decoded,
            reused=tally.reused,
            newly_rejected=frozenset(tally.newly_rejected),
        )

    return whole


# Every manifest row ends in exactly one of the two tables returned (the whole partition in memory: tests, tools).
downscale_partition = _whole_partition(downscale_partition_stream)


def _thumbnail_batches(
    store: ObjectStore,
    manifest: pa.Table,
    limits: ImageLimits,
    max_workers: int | None,
    stored: StoredThumbnails,
    on_done: Callable[[int], None] | None,
    objects_per_batch: int,
    tally: DownscaleTally,
) -> Iterator[pa.RecordBatch]:
    recipe = thumbnail_recipe(limits)
    entries = manifest.to_pylist()
    reusable: dict[tuple[str, str], dict[str, Any]] = {}
    to_decode: list[dict[str, Any]] = []
    for entry in entries:
        key = (entry["image_id"], entry["etag"])
        if entry["image_id"] is not None and key in stored.thumbnail_keys and key not in reusable:
            reusable[key] = entry
        elif (reason := stored.rejections.get((entry["uri"], entry["etag"]))) is not None:
            tally.rejected_rows.append(_rejected_row(entry, _Rejection(reason, by_content=True, reused=True), recipe))
        else:
            to_decode.append(entry)
    kept_uri_by_id: dict[str, str] = {}
    yield from _reused_thumbnails(stored, reusable, recipe, kept_uri_by_id, tally)
    # A stored row not found again (the partition rewritten since its keys were read) is made anew.
    to_decode += reusable.values()
    tally.decoded = len(to_decode)
    tally.reused = len(entries) - len(to_decode)
    if on_done is not None and tally.reused:
        on_done(tally.reused)

    def settle(entry: dict[str, Any]) -> Thumbnail | _Rejection:
        outcome = _thumbnail_or_rejection(store, entry, limits, gate)
        if on_done is not None:
            on_done(1)
        return outcome

    with ThreadPoolExecutor(max_workers=max_workers) as pool:  # I/O and Pillow both release the GIL
        gate = DecodeGate(limits.max_decode_bytes)  # one memory budget for all the pool's decodes
        for start in range(0, len(to_decode), objects_per_batch):
            chunk = to_decode[start : start + objects_per_batch]
            rows: list[dict[str, Any]] = []
            for entry, outcome in zip(chunk, pool.map(settle, chunk)):
                if not isinstance(outcome, _Rejection) and entry["image_id"] in kept_uri_by_id:
                    # Two files with one image_id would each join every sales row of that id.
                    reason = f"duplicate image_id {entry['image_id']!r}: {kept_uri_by_id[entry['image_id']]} has the same name"
                    outcome = _Rejection(reason, by_content=False)
                if isinstance(outcome, _Rejection):
                    tally.rejected_rows.append(_rejected_row(entry, outcome, recipe))
                    tally.newly_rejected.add(entry["uri"])
                    continue
                kept_uri_by_id[entry["image_id"]] = entry["uri"]
                rows.append(_thumbnail_row(entry, outcome, recipe))
            if rows:
                yield pa.RecordBatch.from_pylist(rows, schema=DOWNSCALED_IMAGES_SCHEMA)


def _reused_thumbnails(
    stored: StoredThumbnails,
    reusable: dict[tuple[str, str], dict[str, Any]],
    recipe: str,
    kept_uri_by_id: dict[str, str],
    tally: DownscaleTally,
) -> Iterator[pa.RecordBatch]:
    """The stored rows of the objects kept, streamed a batch at a time, each object once (taken out of `reusable`)."""
    if not reusable:
        return
    columns = DOWNSCALED_IMAGES_SCHEMA.names
    for batch in stored.rows():
        rows = []
        for row in pa.Table.from_batches([batch]).select(columns).to_pylist():
            key = (row["image_id"], row["etag"])
            if key not in reusable or row["decoded_with"] != recipe:
                continue
            entry = reusable.pop(key)
            kept_uri_by_id[row["image_id"]] = entry["uri"]
            rows.append({**row, PARTITION_COLUMN: entry[PARTITION_COLUMN]})
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=DOWNSCALED_IMAGES_SCHEMA)


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
