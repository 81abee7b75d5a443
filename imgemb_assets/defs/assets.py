"""The five assets (plus `rejected_images`), each a Delta table under the lake root.

Each asset computes its rows with a function from `imgemb_assets.core.pipeline`
or `core.sales` and writes one partition (or, for `sales`, the whole table).
"""

# No `from __future__ import annotations` here: Dagster inspects the type of
# `context` when the asset is defined.
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
    multi_asset,
)

from imgemb_assets.core import tables
from imgemb_assets.core.discovery import listing_fingerprint
from imgemb_assets.core.drift import EmbeddingMoments, embedding_drift, previous_partition, stored_moments
from imgemb_assets.core.lake import Lake
from imgemb_assets.core.pipeline import build_manifest, downscale_partition
from imgemb_assets.core.quality import (
    CheckOutcome,
    duplicate_image_ids,
    embedding_values,
    manifest_accounted_for,
    sales_coverage,
)
from imgemb_assets.core.sales import join_with_sales, list_sales_files, read_sales
from imgemb_assets.defs.partitions import s3_prefix_partitions
from imgemb_assets.defs.placement import GPU_POOL
from imgemb_assets.defs.resources import (
    EmbeddingModelResource,
    ImageLimitsResource,
    QualityThresholds,
    StorageResource,
)
from imgemb_assets.defs.retries import STEP_RETRY_POLICY, permanent_failures

_KINDS = {"delta"}
LISTING_FINGERPRINT_KEY = "listing_fingerprint"
# On each sales materialization: the sales rejoin sensor does not re-join a table with duplicates.
DUPLICATED_IMAGE_IDS_KEY = "duplicated_image_ids"
# Joined rows per streamed batch (thumbnails are ~15-30 KB each).
_EMBEDDING_READ_ROWS = 2048


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


def _table_metadata(lake: Lake, name: str, rows: int, **extra: Any) -> dict[str, Any]:
    return {"dagster/row_count": rows, "table_uri": MetadataValue.path(lake.table_uri(name)), **extra}


@asset(
    partitions_def=s3_prefix_partitions,
    kinds=_KINDS,
    group_name="images",
    retry_policy=STEP_RETRY_POLICY,
    description="One row per object under the partition's prefix of the raw-images root.",
)
def raw_image_manifest(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    prefix = context.partition_key
    with permanent_failures():
        objects = list(storage.raw_images().list_objects(prefix))
        if not objects:
            context.log.warning(f"no objects under prefix {prefix!r} of {storage.raw_images_uri}")
        manifest = build_manifest(objects, prefix)
        lake = storage.lake()
        lake.write_partition(tables.RAW_IMAGE_MANIFEST, manifest, prefix)
    return MaterializeResult(
        metadata=_table_metadata(
            lake,
            tables.RAW_IMAGE_MANIFEST,
            manifest.num_rows,
            # compared by the full reconciliation schedule with a fresh listing
            **{LISTING_FINGERPRINT_KEY: listing_fingerprint(objects)},
        )
    )


@multi_asset(
    specs=[
        AssetSpec(
            tables.DOWNSCALED_IMAGES,
            deps=[raw_image_manifest],
            kinds=_KINDS,
            group_name="images",
            description="Each decodable image, oriented, RGB and resized to 224x224, stored as JPEG bytes.",
        ),
        AssetSpec(
            tables.REJECTED_IMAGES,
            deps=[raw_image_manifest],
            kinds=_KINDS,
            group_name="images",
            description="Each manifest object that could not become a thumbnail, with the reason.",
        ),
    ],
    check_specs=[
        AssetCheckSpec(
            "manifest_accounted_for",
            asset=tables.DOWNSCALED_IMAGES,
            description="Every manifest object is in exactly one of downscaled_images and rejected_images.",
        )
    ],
    partitions_def=s3_prefix_partitions,
    can_subset=False,
    retry_policy=STEP_RETRY_POLICY,
)
def downscaled_images(
    context: AssetExecutionContext, storage: StorageResource, image_limits: ImageLimitsResource
) -> Iterator[MaterializeResult]:
    prefix = context.partition_key
    lake = storage.lake()
    with permanent_failures():
        manifest = lake.read(tables.RAW_IMAGE_MANIFEST, prefix)
        result = downscale_partition(storage.raw_images(), manifest, image_limits.limits())
        lake.write_partition(tables.DOWNSCALED_IMAGES, result.images, prefix)
        lake.write_partition(tables.REJECTED_IMAGES, result.rejected, prefix)
    for row in result.rejected.to_pylist():
        context.log.warning(f"rejected {row['uri']}: {row['reason']}")
    yield MaterializeResult(
        asset_key=tables.DOWNSCALED_IMAGES,
        metadata=_table_metadata(lake, tables.DOWNSCALED_IMAGES, result.images.num_rows),
        check_results=[
            _check_result(
                "manifest_accounted_for",
                # what the two tables now hold, read back, against the manifest this step used
                manifest_accounted_for(
                    manifest.column("uri").to_pylist(),
                    lake.read(tables.DOWNSCALED_IMAGES, prefix, columns=["image_id"]).num_rows,
                    lake.read(tables.REJECTED_IMAGES, prefix, columns=["uri"]).column("uri").to_pylist(),
                ),
            )
        ],
    )
    yield MaterializeResult(
        asset_key=tables.REJECTED_IMAGES,
        metadata=_table_metadata(
            lake,
            tables.REJECTED_IMAGES,
            result.rejected.num_rows,
            reasons=MetadataValue.md(_reasons_markdown(result.rejected)),
        ),
    )


@asset(
    kinds=_KINDS,
    group_name="sales",
    retry_policy=STEP_RETRY_POLICY,
    check_specs=[
        AssetCheckSpec(
            "unique_image_ids",
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
        # Validated before anything is written: a bad export leaves the previous version in place.
        table = read_sales(store)
        lake.overwrite(tables.SALES, table)
    unique_ids = duplicate_image_ids(table)
    return MaterializeResult(
        metadata=_table_metadata(
            lake,
            tables.SALES,
            table.num_rows,
            source_files=MetadataValue.json([obj.uri for obj in list_sales_files(store)]),
            **{DUPLICATED_IMAGE_IDS_KEY: unique_ids.metadata["duplicated_ids"]},
        ),
        check_results=[_check_result("unique_image_ids", unique_ids)],
    )


@asset(
    deps=[tables.DOWNSCALED_IMAGES, sales],
    partitions_def=s3_prefix_partitions,
    kinds=_KINDS,
    group_name="embeddings",
    retry_policy=STEP_RETRY_POLICY,
    check_specs=[
        AssetCheckSpec(
            "sales_coverage",
            asset=tables.IMAGES_WITH_SALES,
            description="Share of the partition's images with a sales row; warns below the quality threshold.",
        )
    ],
    description="Inner join of the partition's thumbnails with sales on image_id.",
)
def images_with_sales(
    context: AssetExecutionContext, storage: StorageResource, quality: QualityThresholds
) -> MaterializeResult:
    prefix = context.partition_key
    lake = storage.lake()
    with permanent_failures():
        sales_table = lake.read(tables.SALES)
        images = lake.read(tables.DOWNSCALED_IMAGES, prefix)
        joined = join_with_sales(images, sales_table, tables.images_with_sales_schema(sales_table.schema))
        lake.write_partition(tables.IMAGES_WITH_SALES, joined, prefix)
    coverage = sales_coverage(joined.num_rows, images.num_rows, quality.min_sales_coverage)
    return MaterializeResult(
        metadata=_table_metadata(lake, tables.IMAGES_WITH_SALES, joined.num_rows),
        check_results=[_check_result("sales_coverage", coverage, AssetCheckSeverity.WARN)],
    )


def build_image_embeddings(gpu_tags: Mapping[str, str]) -> AssetsDefinition:
    """The embedding asset: the only step in the `gpu` pool, carrying the GPU request in its tags."""

    @asset(
        name=tables.IMAGE_EMBEDDINGS,
        deps=[images_with_sales],
        partitions_def=s3_prefix_partitions,
        kinds={"delta", "pytorch"},
        group_name="embeddings",
        pool=GPU_POOL,
        op_tags=dict(gpu_tags),
        retry_policy=STEP_RETRY_POLICY,
        check_specs=[
            AssetCheckSpec(
                "embedding_values",
                asset=tables.IMAGE_EMBEDDINGS,
                description="Every vector has the model's width and only finite values.",
            ),
            AssetCheckSpec(
                "embedding_drift",
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
    ) -> MaterializeResult:
        with permanent_failures():
            return _materialize_embeddings(context, storage, embedding_model, quality)

    return image_embeddings


def _materialize_embeddings(
    context: AssetExecutionContext,
    storage: StorageResource,
    embedding_model: EmbeddingModelResource,
    quality: QualityThresholds,
) -> MaterializeResult:
    # torch is imported here, by the one step that needs it, rather than by
    # every process that loads the code location (several seconds each).
    from imgemb_assets.core.embedding_partition import EmbeddingRun, embed_partition_batches

    prefix = context.partition_key
    lake = storage.lake()
    settings = embedding_model.settings()
    # The partition streams through in batches and is written in one commit,
    # so memory does not grow with the partition.
    joined = lake.read_batches(tables.IMAGES_WITH_SALES, prefix, batch_rows=_EMBEDDING_READ_ROWS)
    previous = (
        lake.read(tables.IMAGE_EMBEDDINGS, prefix, columns=["image_id", "etag", "model_id", "embedding"])
        if lake.exists(tables.IMAGE_EMBEDDINGS)
        else None
    )
    schema = tables.image_embeddings_schema(_sales_schema_of(joined.schema))
    run = EmbeddingRun()
    rows = lake.write_partition_stream(
        tables.IMAGE_EMBEDDINGS, embed_partition_batches(joined, previous, settings, schema, run), schema, prefix
    )
    if run.model is not None and run.model.is_random:
        context.log.warning(f"embedded with {run.model.weights_description}")
    model_metadata = (
        {
            "weights": run.model.weights_description,
            "embedding_width": run.model.width,
            "device": str(run.model.device),
            "precision": str(run.model.dtype).removeprefix("torch."),
            "batch_size": run.model.batch_size,
        }
        if run.model is not None
        else {"weights": "model not loaded: every vector was reused"}
    )
    return MaterializeResult(
        metadata=_table_metadata(
            lake,
            tables.IMAGE_EMBEDDINGS,
            rows,
            model_id=run.model_id,
            images_embedded=run.images_embedded,
            images_reused=run.images_reused,
            embedding_seconds=round(run.seconds, 3),
            images_per_second=round(run.images_per_second, 2),
            **model_metadata,
        ),
        check_results=[
            _check_result(
                "embedding_values",
                embedding_values(run.widths, run.model.width if run.model else None, run.non_finite_rows, run.rows),
            ),
            _check_result(
                "embedding_drift",
                _drift_against_previous_partition(lake, prefix, run.model_id, run.moments, quality),
                AssetCheckSeverity.WARN,
            ),
        ],
    )


def _drift_against_previous_partition(
    lake: Lake, prefix: str, model_id: str, moments: EmbeddingMoments, quality: QualityThresholds
) -> CheckOutcome:
    previous_key = previous_partition(lake.partition_keys(tables.IMAGE_EMBEDDINGS), prefix)
    previous = (
        stored_moments(lake, tables.IMAGE_EMBEDDINGS, previous_key, model_id) if previous_key is not None else None
    )
    return embedding_drift(moments, previous, previous_key, quality.drift_thresholds())


def _sales_schema_of(joined_schema: pa.Schema) -> pa.Schema:
    """The sales columns carried by a joined table, as a sales schema (image_id first)."""
    image_columns = set(tables.DOWNSCALED_IMAGES_SCHEMA.names)
    return pa.schema([joined_schema.field("image_id")] + [f for f in joined_schema if f.name not in image_columns])


def _reasons_markdown(rejected: pa.Table) -> str:
    if rejected.num_rows == 0:
        return "No rejected objects."
    counts = Counter(rejected.column("reason").to_pylist())
    lines = ["| reason | objects |", "| --- | --- |"]
    lines += [f"| {reason.replace('|', '/')} | {count} |" for reason, count in counts.most_common()]
    return "\n".join(lines)
