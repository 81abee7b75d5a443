"""The sales assets: `sales_export` (the parquet files under the sales root, reported by the sales
sensor), the validated `sales` table, and `images_with_sales`, each prefix's thumbnails joined with it.

Rows come from `imgemb_assets.core.sales`; `location/automation.py` says when each asset runs.
"""

# No `from __future__ import annotations` here: Dagster inspects the type of
# `context` when the asset is defined.
from collections.abc import Iterator, Sequence

import dagster as dg

from imgemb_assets.core.ingest.discovery import listing_fingerprint
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.commits import all_of
from imgemb_assets.core.quality.checks import CheckOutcome, duplicate_image_ids, sales_coverage
from imgemb_assets.core.sales.join import join_with_sales, list_sales_files, read_sales
from imgemb_assets.dagster_wiring.location.automation import FOLLOWS_SOURCE
from imgemb_assets.dagster_wiring.location.partition_steps import (
    AssetReport,
    CheckReport,
    StepEvent,
    materialize_prefixes,
)
from imgemb_assets.dagster_wiring.location.partitions import per_prefix_asset, still_registered
from imgemb_assets.dagster_wiring.location.resources import QualityThresholds, StorageResource
from imgemb_assets.dagster_wiring.location.retries import STEP_RETRY_POLICY, permanent_failures
from imgemb_assets.dagster_wiring.location.table_metadata import table_metadata
from imgemb_assets.dagster_wiring.names import (
    DUPLICATED_IMAGE_IDS_KEY,
    SALES_COVERAGE_CHECK,
    SALES_EXPORT,
    SALES_FILES_FINGERPRINT_KEY,
    UNIQUE_IMAGE_IDS_CHECK,
)

# What the pipeline reads but does not write: the sales sensor reports a new
# materialization of it when the files change, and automation follows.
sales_export = dg.AssetSpec(
    SALES_EXPORT,
    group_name="sales",
    kinds={"parquet"},
    description="The parquet files under the sales root (reported by sales_change_sensor when they change).",
)


def build_sales_assets(policy: dg.BackfillPolicy) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """The sales assets; the join's runs cover the prefixes `policy` allows."""
    return [sales_export, sales, _images_with_sales(policy)]


def _check_result(
    check_name: str, outcome: CheckOutcome, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=outcome.passed,
        severity=severity,
        description=outcome.description,
        metadata=outcome.metadata,
    )


@dg.asset(
    deps=[sales_export],
    kinds={"delta"},
    group_name="sales",
    automation_condition=FOLLOWS_SOURCE,
    retry_policy=STEP_RETRY_POLICY,
    check_specs=[
        dg.AssetCheckSpec(
            UNIQUE_IMAGE_IDS_CHECK,
            asset=tables.SALES,
            blocking=True,
            description="Each image_id once: the inner join would otherwise multiply embedding rows.",
        )
    ],
    description="Every parquet file under the sales root, validated: string image_id, numeric sales, other columns kept.",
)
def sales(storage: StorageResource) -> dg.MaterializeResult:
    store = storage.sales()
    lake = storage.lake()
    with permanent_failures():
        files = list_sales_files(store)
        # Validated, and its column types checked against what the lake's tables already hold, before
        # anything is written: a refused export leaves every table as it was.
        table = read_sales(store, lake, files)  # the files listed above, so the metadata names what was read
        lake.overwrite(tables.SALES, table)
    duplicates = duplicate_image_ids(table)
    return dg.MaterializeResult(
        metadata=table_metadata(
            lake,
            tables.SALES,
            table.num_rows,
            table.schema,
            source_files=dg.MetadataValue.json([obj.uri for obj in files]),
            **{
                DUPLICATED_IMAGE_IDS_KEY: duplicates.metadata["duplicated_ids"],
                SALES_FILES_FINGERPRINT_KEY: listing_fingerprint(files),
            },
        ),
        check_results=[_check_result(UNIQUE_IMAGE_IDS_CHECK, duplicates)],
    )


def _images_with_sales(policy: dg.BackfillPolicy) -> dg.AssetsDefinition:
    @dg.asset(
        **per_prefix_asset(policy),
        name=tables.IMAGES_WITH_SALES,
        deps=[tables.DOWNSCALED_IMAGES, sales],
        kinds={"delta"},
        group_name="embeddings",
        check_specs=[
            dg.AssetCheckSpec(
                SALES_COVERAGE_CHECK,
                asset=tables.IMAGES_WITH_SALES,
                description="Share of the partition's images with a sales row; warns below the quality threshold.",
            )
        ],
        description="Inner join of the partition's thumbnails with sales on image_id.",
    )
    def images_with_sales(
        context: dg.AssetExecutionContext, storage: StorageResource, quality: QualityThresholds
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
                    [CheckReport(SALES_COVERAGE_CHECK, coverage, dg.AssetCheckSeverity.WARN)],
                )
            ]

        yield from materialize_prefixes(context, write)

    return images_with_sales
