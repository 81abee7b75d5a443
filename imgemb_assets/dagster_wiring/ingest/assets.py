"""The ingest assets: `raw_images` (the objects under each prefix, reported by the discovery sensor),
`raw_image_manifest`, and `downscaled_images` with `rejected_images`, each a Delta table under the lake root.

Each asset computes its rows with a function from `imgemb_assets.core.ingest` and writes one
partition per prefix of its run. A run covers a range of prefixes, at most the location's
`max_partitions_per_run` (Dagster's `BackfillPolicy`); `location/partition_steps.py` writes and
reports each prefix on its own. `location/automation.py` says when each asset runs.
"""

# No `from __future__ import annotations` here: Dagster inspects the type of
# `context` when the asset is defined.
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Final

import dagster as dg
import pyarrow as pa

from imgemb_assets.core.embedding.progress import Progress
from imgemb_assets.core.imaging.contact_sheet import RejectedObject, markdown_bytes, rejected_images_sheet
from imgemb_assets.core.ingest.discovery import partition_fingerprint
from imgemb_assets.core.ingest.manifest import build_manifest
from imgemb_assets.core.ingest.thumbnails import (
    STORED_BATCH_ROWS,
    StoredThumbnails,
    downscale_partition_stream,
    thumbnail_recipe,
)
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.commits import all_of
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.quality.checks import manifest_accounted_for
from imgemb_assets.core.storage.objects import ObjectStore
from imgemb_assets.dagster_wiring.ingest.resources import ImageLimitsResource
from imgemb_assets.dagster_wiring.location.automation import FOLLOWS_SOURCE, FOLLOWS_UPSTREAM
from imgemb_assets.dagster_wiring.location.partition_steps import (
    AssetReport,
    CheckReport,
    StepEvent,
    materialize_prefixes,
)
from imgemb_assets.dagster_wiring.location.partitions import per_prefix_asset, s3_prefix_partitions, still_registered
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.location.retries import STEP_RETRY_POLICY, permanent_failures
from imgemb_assets.dagster_wiring.location.table_metadata import table_metadata
from imgemb_assets.dagster_wiring.names import LISTING_FINGERPRINT_KEY, MANIFEST_ACCOUNTED_FOR_CHECK, RAW_IMAGES

# What the pipeline reads but does not write: the discovery sensor reports a new
# materialization of it when a prefix's objects change, and automation follows.
raw_images = dg.AssetSpec(
    RAW_IMAGES,
    partitions_def=s3_prefix_partitions,
    group_name="images",
    kinds={"s3"},
    description="The objects under each prefix of the raw-images root (reported by raw_prefix_sensor when "
    "a prefix appears or its listing changes).",
)


def build_ingest_assets(policy: dg.BackfillPolicy) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """The ingest assets; runs cover the prefixes `policy` allows."""
    return [raw_images, _raw_image_manifest(policy), _downscaled_images(policy)]


def _raw_image_manifest(policy: dg.BackfillPolicy) -> dg.AssetsDefinition:
    @dg.asset(
        **per_prefix_asset(policy, FOLLOWS_SOURCE),
        name=tables.RAW_IMAGE_MANIFEST,
        deps=[raw_images],
        kinds={"delta"},
        group_name="images",
        description="One row per object under the partition's prefix of the raw-images root.",
    )
    def raw_image_manifest(context: dg.AssetExecutionContext, storage: StorageResource) -> Iterator[StepEvent]:
        with permanent_failures():
            lake = storage.lake_for_partitions()  # written with this partition scheme, or refused
        # One per step: a unit (a split folder, the loose objects) is listed once for all its partitions.
        root = storage.partitioned_root()

        def write(prefix: str) -> Sequence[AssetReport]:
            objects = root.list_partition(prefix)
            if not objects:
                context.log.warning(f"no objects in partition {prefix!r} of {storage.raw_images_uri}")
            manifest = build_manifest(objects, prefix)
            registered = still_registered(context.instance, prefix)  # not for a prefix removed meanwhile
            lake.write_partition(tables.RAW_IMAGE_MANIFEST, manifest, prefix, registered)
            # compared by the sensors and the reconciliation with a fresh listing
            metadata = table_metadata(
                lake,
                tables.RAW_IMAGE_MANIFEST,
                manifest.num_rows,
                tables.RAW_IMAGE_MANIFEST_SCHEMA,
                **{LISTING_FINGERPRINT_KEY: partition_fingerprint(root.scheme, prefix, objects)},
            )
            return [AssetReport(tables.RAW_IMAGE_MANIFEST, metadata)]

        yield from materialize_prefixes(context, write)

    return raw_image_manifest


# The two tables one read of the manifest writes.
_FROM_THE_MANIFEST: Final[dict[str, Any]] = {
    "deps": [tables.RAW_IMAGE_MANIFEST],
    "kinds": {"delta"},
    "group_name": "images",
    "automation_condition": FOLLOWS_UPSTREAM,
}


def _downscaled_images(policy: dg.BackfillPolicy) -> dg.AssetsDefinition:
    @dg.multi_asset(
        specs=[
            dg.AssetSpec(
                tables.DOWNSCALED_IMAGES,
                description="Each decodable image, oriented, RGB and resized to 224x224, stored as JPEG bytes.",
                **_FROM_THE_MANIFEST,
            ),
            dg.AssetSpec(
                tables.REJECTED_IMAGES,
                description="Each manifest object that could not become a thumbnail, with the reason.",
                **_FROM_THE_MANIFEST,
            ),
        ],
        check_specs=[
            dg.AssetCheckSpec(
                MANIFEST_ACCOUNTED_FOR_CHECK,
                asset=tables.DOWNSCALED_IMAGES,
                description="Every manifest object is in exactly one of downscaled_images and rejected_images.",
            )
        ],
        name="downscaled_images",
        partitions_def=s3_prefix_partitions,
        backfill_policy=policy,
        can_subset=False,
        retry_policy=STEP_RETRY_POLICY,
    )
    def downscaled_images(
        context: dg.AssetExecutionContext, storage: StorageResource, image_limits: ImageLimitsResource
    ) -> Iterator[StepEvent]:
        lake, store, limits = storage.lake(), storage.raw_images(), image_limits.limits()
        recipe = thumbnail_recipe(limits)

        def write(prefix: str) -> Sequence[AssetReport]:
            # Never commit over a newer result (see `Lake.unchanged_since`), nor for a prefix removed meanwhile.
            manifest_unchanged = all_of(
                lake.unchanged_since(tables.RAW_IMAGE_MANIFEST, prefix), still_registered(context.instance, prefix)
            )
            manifest = lake.read(tables.RAW_IMAGE_MANIFEST, prefix)
            # Unchanged objects keep their stored thumbnail or rejection: only new or changed ones are read.
            stored = _stored_thumbnails(lake, prefix, recipe)
            progress = Progress(f"{prefix}: thumbnails", manifest.num_rows, context.log.info, metadata_prefix="objects")
            # Streamed to the table a batch of objects at a time: memory does not grow with the prefix.
            batches, tally = downscale_partition_stream(
                store, manifest, limits, stored=stored, on_done=progress.advance
            )
            thumbnails = lake.write_partition_stream(
                tables.DOWNSCALED_IMAGES, batches, tables.DOWNSCALED_IMAGES_SCHEMA, prefix, manifest_unchanged
            )
            progress.finish()
            rejected = tally.rejected()
            lake.write_partition(tables.REJECTED_IMAGES, rejected, prefix, manifest_unchanged)
            for row in rejected.to_pylist():
                context.log.warning(f"rejected {row['uri']}: {row['reason']}")
            # what the two tables now hold, read back, against the manifest this step used
            accounted_for = manifest_accounted_for(
                manifest.column("uri").to_pylist(),
                lake.read(tables.DOWNSCALED_IMAGES, prefix, columns=["image_id"]).num_rows,
                lake.read(tables.REJECTED_IMAGES, prefix, columns=["uri"]).column("uri").to_pylist(),
            )
            return [
                AssetReport(
                    tables.DOWNSCALED_IMAGES,
                    table_metadata(
                        lake,
                        tables.DOWNSCALED_IMAGES,
                        thumbnails,
                        tables.DOWNSCALED_IMAGES_SCHEMA,
                        objects_decoded=tally.decoded,
                        objects_reused=tally.reused,
                        **progress.metadata(),
                    ),
                    [CheckReport(MANIFEST_ACCOUNTED_FOR_CHECK, accounted_for)],
                ),
                AssetReport(
                    tables.REJECTED_IMAGES,
                    table_metadata(
                        lake,
                        tables.REJECTED_IMAGES,
                        rejected.num_rows,
                        tables.REJECTED_IMAGES_SCHEMA,
                        reasons=dg.MetadataValue.md(_reasons_markdown(rejected)),
                        # of this write's new rejections: a reused one is not read again for its preview
                        **_rejected_contact_sheet(rejected, frozenset(tally.newly_rejected), manifest, store),
                    ),
                ),
            ]

        yield from materialize_prefixes(context, write)

    return downscaled_images


def _stored_thumbnails(lake: Lake, prefix: str, recipe: str) -> StoredThumbnails:
    """A partition's stored thumbnails (their keys; rows streamed when reused) and rejections, for its rewrite."""
    rejected = _stored_partition(lake, tables.REJECTED_IMAGES, prefix)  # no image bytes: small
    if not lake.exists(tables.DOWNSCALED_IMAGES):
        return StoredThumbnails.of(None, rejected, recipe)
    key_columns = ["image_id", "etag", "decoded_with"]
    if not set(key_columns) <= set(lake.read_batches(tables.DOWNSCALED_IMAGES, prefix).schema.names):
        return StoredThumbnails.of(None, rejected, recipe)  # written before thumbnails recorded their recipe
    keys = lake.read(tables.DOWNSCALED_IMAGES, prefix, columns=key_columns)
    return StoredThumbnails.streamed(
        keys,
        lambda: lake.read_batches(tables.DOWNSCALED_IMAGES, prefix, batch_rows=STORED_BATCH_ROWS),
        rejected,
        recipe,
    )


def _stored_partition(lake: Lake, table: str, prefix: str) -> pa.Table | None:
    """What a table holds of one partition now (reused by its rewrite), or None before its first write."""
    return lake.read(table, prefix) if lake.exists(table) else None


def _rejected_contact_sheet(
    rejected: pa.Table, newly_rejected: frozenset[str], manifest: pa.Table, store: ObjectStore
) -> dict[str, Any]:
    """A contact sheet of the first objects this write rejected, with their reasons, and its bytes; nothing when none was."""
    rejected = rejected.filter(
        pa.array([uri in newly_rejected for uri in rejected.column("uri").to_pylist()], pa.bool_())
    )
    if rejected.num_rows == 0:
        return {}
    sizes = dict(zip(manifest.column("uri").to_pylist(), manifest.column("size_bytes").to_pylist(), strict=True))
    objects = [
        RejectedObject(row["image_id"], row["uri"], row["reason"], sizes.get(row["uri"]))
        for row in rejected.select(["image_id", "uri", "reason"]).to_pylist()
    ]
    sheet = rejected_images_sheet(objects, store.read_bytes)
    return {"contact_sheet": dg.MetadataValue.md(sheet), "contact_sheet_bytes": markdown_bytes(sheet)}


def _reasons_markdown(rejected: pa.Table) -> str:
    if rejected.num_rows == 0:
        return "No rejected objects."
    counts = Counter(rejected.column("reason").to_pylist())
    lines = ["| reason | objects |", "| --- | --- |"]
    lines += [f"| {reason.replace('|', '/')} | {count} |" for reason, count in counts.most_common()]
    return "\n".join(lines)
