"""The five assets (plus `rejected_images`), each a Delta table under the lake root, and the two
external assets they read: the raw images under each prefix and the sales export.

Each asset computes its rows with a function from `imgemb_assets.core.ingest.manifest`, `core.thumbnails`
or `core.sales` and writes one partition per prefix of its run (or, for `sales`,
the whole table). A run covers a range of prefixes, at most the location's
`max_partitions_per_run` (Dagster's `BackfillPolicy`); `partition_steps` writes
and reports each prefix on its own. `automation` says when each asset runs.
"""

# No `from __future__ import annotations` here: Dagster inspects the type of
# `context` when the asset is defined.
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSpec,
    BackfillPolicy,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from imgemb_assets.core.embedding.progress import Progress
from imgemb_assets.core.imaging.contact_sheet import RejectedObject, markdown_bytes, rejected_images_sheet
from imgemb_assets.core.ingest.discovery import listing_fingerprint, partition_fingerprint
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
from imgemb_assets.core.quality.checks import (
    CheckOutcome,
    duplicate_image_ids,
    manifest_accounted_for,
    sales_coverage,
)
from imgemb_assets.core.sales.join import join_with_sales, list_sales_files, read_sales
from imgemb_assets.core.storage.objects import ObjectStore
from imgemb_assets.dagster_wiring.automation import FOLLOWS_SOURCE, FOLLOWS_UPSTREAM
from imgemb_assets.dagster_wiring.embedding_step import EMBEDDING_DRIFT_CHECK, EMBEDDING_VALUES_CHECK, embed_prefix
from imgemb_assets.dagster_wiring.evaluation import build_evaluation_asset
from imgemb_assets.dagster_wiring.partition_steps import AssetReport, CheckReport, StepEvent, materialize_prefixes
from imgemb_assets.dagster_wiring.partitions import s3_prefix_partitions, still_registered
from imgemb_assets.dagster_wiring.placement import GPU_POOL, gpu_step_tags
from imgemb_assets.dagster_wiring.resources import (
    EmbeddingModelResource,
    ImageLimitsResource,
    QualityThresholds,
    StorageResource,
)
from imgemb_assets.dagster_wiring.retries import STEP_RETRY_POLICY, permanent_failures
from imgemb_assets.dagster_wiring.settings import LocationSettings
from imgemb_assets.dagster_wiring.similarity import build_similarity_assets
from imgemb_assets.dagster_wiring.table_metadata import table_metadata

_KINDS = {"delta"}
# On raw_images events and raw_image_manifest materializations: the prefix's listing.
LISTING_FINGERPRINT_KEY = "listing_fingerprint"
# On sales_export events and sales materializations: the sales files' listing.
SALES_FILES_FINGERPRINT_KEY = "sales_files_fingerprint"
# On each sales materialization: nothing joins a table with duplicated image_ids.
DUPLICATED_IMAGE_IDS_KEY = "duplicated_image_ids"

# The asset checks' names, each used by its spec and by its result.
MANIFEST_ACCOUNTED_FOR_CHECK: Final = "manifest_accounted_for"
UNIQUE_IMAGE_IDS_CHECK: Final = "unique_image_ids"
SALES_COVERAGE_CHECK: Final = "sales_coverage"

RAW_IMAGES: Final = "raw_images"
SALES_EXPORT: Final = "sales_export"

# What the pipeline reads but does not write: the discovery and sales sensors report
# a new materialization of these when the objects change, and automation follows.
raw_images = AssetSpec(
    RAW_IMAGES,
    partitions_def=s3_prefix_partitions,
    group_name="images",
    kinds={"s3"},
    description="The objects under each prefix of the raw-images root (reported by raw_prefix_sensor when "
    "a prefix appears or its listing changes).",
)
sales_export = AssetSpec(
    SALES_EXPORT,
    group_name="sales",
    kinds={"parquet"},
    description="The parquet files under the sales root (reported by sales_change_sensor when they change).",
)


def _check_result(
    check_name: str, outcome: CheckOutcome, severity: AssetCheckSeverity = AssetCheckSeverity.ERROR
) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=check_name,
        passed=outcome.passed,
        severity=severity,
        description=outcome.description,
        metadata=outcome.metadata,
    )


def build_assets(settings: LocationSettings, model_code_version: str) -> list[AssetsDefinition | AssetSpec]:
    """Every asset of the location; runs take at most `settings.max_partitions_per_run` prefixes.

    `model_code_version` (`EmbeddingModelResource.code_version`) is the embedding asset's code
    version, so the UI marks partitions embedded with other weights stale.
    """
    policy = BackfillPolicy.multi_run(max_partitions_per_run=settings.max_partitions_per_run)
    return [
        raw_images,
        sales_export,
        _raw_image_manifest(policy),
        _downscaled_images(policy),
        sales,
        _images_with_sales(policy),
        _image_embeddings(policy, gpu_step_tags(settings), model_code_version),
        build_evaluation_asset(policy, model_code_version),
        build_similarity_assets(model_code_version),
    ]


def _raw_image_manifest(policy: BackfillPolicy) -> AssetsDefinition:
    @asset(
        name=tables.RAW_IMAGE_MANIFEST,
        deps=[raw_images],
        partitions_def=s3_prefix_partitions,
        backfill_policy=policy,
        automation_condition=FOLLOWS_SOURCE,
        kinds=_KINDS,
        group_name="images",
        retry_policy=STEP_RETRY_POLICY,
        description="One row per object under the partition's prefix of the raw-images root.",
    )
    def raw_image_manifest(context: AssetExecutionContext, storage: StorageResource) -> Iterator[StepEvent]:
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


def _downscaled_images(policy: BackfillPolicy) -> AssetsDefinition:
    @multi_asset(
        specs=[
            AssetSpec(
                tables.DOWNSCALED_IMAGES,
                deps=[tables.RAW_IMAGE_MANIFEST],
                kinds=_KINDS,
                group_name="images",
                automation_condition=FOLLOWS_UPSTREAM,
                description="Each decodable image, oriented, RGB and resized to 224x224, stored as JPEG bytes.",
            ),
            AssetSpec(
                tables.REJECTED_IMAGES,
                deps=[tables.RAW_IMAGE_MANIFEST],
                kinds=_KINDS,
                group_name="images",
                automation_condition=FOLLOWS_UPSTREAM,
                description="Each manifest object that could not become a thumbnail, with the reason.",
            ),
        ],
        check_specs=[
            AssetCheckSpec(
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
        context: AssetExecutionContext, storage: StorageResource, image_limits: ImageLimitsResource
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
                        reasons=MetadataValue.md(_reasons_markdown(rejected)),
                        # of this write's new rejections: a reused one is not read again for its preview
                        **_rejected_contact_sheet(rejected, frozenset(tally.newly_rejected), manifest, store),
                    ),
                ),
            ]

        yield from materialize_prefixes(context, write)

    return downscaled_images


@asset(
    deps=[sales_export],
    kinds=_KINDS,
    group_name="sales",
    automation_condition=FOLLOWS_SOURCE,
    retry_policy=STEP_RETRY_POLICY,
    check_specs=[
        AssetCheckSpec(
            UNIQUE_IMAGE_IDS_CHECK,
            asset=tables.SALES,
            blocking=True,
            description="Each image_id once: the inner join would otherwise multiply embedding rows.",
        )
    ],
    description="Every parquet file under the sales root, validated: string image_id, numeric sales, other columns kept.",
)
def sales(storage: StorageResource) -> MaterializeResult:
    store = storage.sales()
    lake = storage.lake()
    with permanent_failures():
        files = list_sales_files(store)
        # Validated, and its column types checked against what the lake's tables already hold, before
        # anything is written: a refused export leaves every table as it was.
        table = read_sales(store, lake, files)  # the files listed above, so the metadata names what was read
        lake.overwrite(tables.SALES, table)
    duplicates = duplicate_image_ids(table)
    return MaterializeResult(
        metadata=table_metadata(
            lake,
            tables.SALES,
            table.num_rows,
            table.schema,
            source_files=MetadataValue.json([obj.uri for obj in files]),
            **{
                DUPLICATED_IMAGE_IDS_KEY: duplicates.metadata["duplicated_ids"],
                SALES_FILES_FINGERPRINT_KEY: listing_fingerprint(files),
            },
        ),
        check_results=[_check_result(UNIQUE_IMAGE_IDS_CHECK, duplicates)],
    )


def _images_with_sales(policy: BackfillPolicy) -> AssetsDefinition:
    @asset(
        name=tables.IMAGES_WITH_SALES,
        deps=[tables.DOWNSCALED_IMAGES, sales],
        partitions_def=s3_prefix_partitions,
        backfill_policy=policy,
        automation_condition=FOLLOWS_UPSTREAM,
        kinds=_KINDS,
        group_name="embeddings",
        retry_policy=STEP_RETRY_POLICY,
        check_specs=[
            AssetCheckSpec(
                SALES_COVERAGE_CHECK,
                asset=tables.IMAGES_WITH_SALES,
                description="Share of the partition's images with a sales row; warns below the quality threshold.",
            )
        ],
        description="Inner join of the partition's thumbnails with sales on image_id.",
    )
    def images_with_sales(
        context: AssetExecutionContext, storage: StorageResource, quality: QualityThresholds
    ) -> Iterator[StepEvent]:
        lake = storage.lake()
        with permanent_failures():
            sales_unchanged = lake.unchanged_since(tables.SALES)
            sales_table = lake.read(tables.SALES)  # once for the whole range
            schema = tables.images_with_sales_schema(sales_table.schema)

        def write(prefix: str) -> Sequence[AssetReport]:
            # A sales refresh or a re-downscale landing meanwhile: the join is retried on the new rows.
            inputs_unchanged = all_of(
                sales_unchanged,
                lake.unchanged_since(tables.DOWNSCALED_IMAGES, prefix),
                still_registered(context.instance, prefix),
            )
            images = lake.read(tables.DOWNSCALED_IMAGES, prefix)
            joined = join_with_sales(images, sales_table, schema)
            lake.write_partition(tables.IMAGES_WITH_SALES, joined, prefix, inputs_unchanged)
            coverage = sales_coverage(joined.num_rows, images.num_rows, quality.min_sales_coverage)
            return [
                AssetReport(
                    tables.IMAGES_WITH_SALES,
                    table_metadata(lake, tables.IMAGES_WITH_SALES, joined.num_rows, schema),
                    [CheckReport(SALES_COVERAGE_CHECK, coverage, AssetCheckSeverity.WARN)],
                )
            ]

        yield from materialize_prefixes(context, write)

    return images_with_sales


def _image_embeddings(policy: BackfillPolicy, gpu_tags: Mapping[str, str], code_version: str) -> AssetsDefinition:
    """The embedding asset: the only step in the `gpu` pool, carrying the GPU request in its tags."""

    @asset(
        name=tables.IMAGE_EMBEDDINGS,
        code_version=code_version,
        deps=[tables.IMAGES_WITH_SALES],
        partitions_def=s3_prefix_partitions,
        backfill_policy=policy,
        automation_condition=FOLLOWS_UPSTREAM,
        kinds={"delta", "pytorch"},
        group_name="embeddings",
        pool=GPU_POOL,
        op_tags=dict(gpu_tags),
        retry_policy=STEP_RETRY_POLICY,
        check_specs=[
            AssetCheckSpec(
                EMBEDDING_VALUES_CHECK,
                asset=tables.IMAGE_EMBEDDINGS,
                description="Every vector has the model's width and only finite values.",
            ),
            AssetCheckSpec(
                EMBEDDING_DRIFT_CHECK,
                asset=tables.IMAGE_EMBEDDINGS,
                description="Mean shift, per-dimension variance shift and centroid cosine against the previous "
                "partition (the greatest prefix below this one); warns past the quality thresholds.",
            ),
        ],
        description="ResNet50 (classifier removed) embedding of every joined image, with its sales columns.",
    )
    def image_embeddings(
        context: AssetExecutionContext,
        storage: StorageResource,
        embedding_model: EmbeddingModelResource,
        quality: QualityThresholds,
    ) -> Iterator[StepEvent]:
        # torch is imported here, by the one step that needs it, rather than by
        # every process that loads the code location (several seconds each).
        from imgemb_assets.core.embedding.partition import SharedModel

        with permanent_failures():
            # Built at most once per step, on the first prefix that needs it.
            model = SharedModel(embedding_model.settings())
        lake = storage.lake()
        yield from materialize_prefixes(context, lambda prefix: embed_prefix(context, lake, prefix, model, quality))

    return image_embeddings


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
    return {"contact_sheet": MetadataValue.md(sheet), "contact_sheet_bytes": markdown_bytes(sheet)}


def _reasons_markdown(rejected: pa.Table) -> str:
    if rejected.num_rows == 0:
        return "No rejected objects."
    counts = Counter(rejected.column("reason").to_pylist())
    lines = ["| reason | objects |", "| --- | --- |"]
    lines += [f"| {reason.replace('|', '/')} | {count} |" for reason, count in counts.most_common()]
    return "\n".join(lines)
