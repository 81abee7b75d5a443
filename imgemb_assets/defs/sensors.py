"""Sensors: new or changed prefixes, changed sales files, and the re-join a sales refresh needs."""

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    EventLogEntry,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    asset_sensor,
    sensor,
)

from imgemb_assets.core import tables
from imgemb_assets.core.discovery import DiscoveryCursor, listing_fingerprint, plan_discovery
from imgemb_assets.core.sales import list_sales_files
from imgemb_assets.defs.assets import DUPLICATED_IMAGE_IDS_KEY
from imgemb_assets.defs.jobs import embed_prefix_job, refresh_sales_job, rejoin_sales_job
from imgemb_assets.defs.partitions import s3_prefix_partitions
from imgemb_assets.defs.resources import StorageResource

DEFAULT_MINIMUM_INTERVAL_S = 30
DEFAULT_RECENT_PREFIXES = 3
DEFAULT_MAX_NEW_PREFIXES = 100
_ROOT_OBJECTS_SHOWN = 10


def build_raw_prefix_sensor(
    minimum_interval_seconds: int = DEFAULT_MINIMUM_INTERVAL_S,
    recent_prefixes: int = DEFAULT_RECENT_PREFIXES,
    max_new_prefixes: int = DEFAULT_MAX_NEW_PREFIXES,
) -> SensorDefinition:
    """The discovery sensor; its interval, the recent prefixes it re-lists and the new ones it takes per tick are settings."""

    @sensor(
        name="raw_prefix_sensor",
        job=embed_prefix_job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description=(
            "Registers new prefixes of the raw-images root as s3_prefix partitions and requests a run for "
            f"every new or changed prefix (re-lists new prefixes and the {recent_prefixes} most recent ones)."
        ),
    )
    def raw_prefix_sensor(context: SensorEvaluationContext, storage: StorageResource) -> SensorResult:
        cursor = DiscoveryCursor.from_json(context.cursor)
        plan = plan_discovery(storage.raw_images(), cursor, recent=recent_prefixes, max_new=max_new_prefixes)
        _report_root_objects(context, plan.root_objects)
        partition_requests = [s3_prefix_partitions.build_add_request(plan.new_prefixes)] if plan.new_prefixes else []
        if plan.changed and not storage.lake().exists(tables.SALES):
            # The join needs the sales table: register now, request once sales exists.
            context.log.info(f"waiting for the sales table before requesting {sorted(plan.changed)}")
            return SensorResult(dynamic_partitions_requests=partition_requests, cursor=cursor.to_json())
        return SensorResult(
            run_requests=[
                RunRequest(run_key=f"{prefix}:{fingerprint}", partition_key=prefix)
                for prefix, fingerprint in sorted(plan.changed.items())
            ],
            dynamic_partitions_requests=partition_requests,
            cursor=plan.cursor.to_json(),
        )

    return raw_prefix_sensor


def build_sales_change_sensor(minimum_interval_seconds: int = DEFAULT_MINIMUM_INTERVAL_S) -> SensorDefinition:
    @sensor(
        name="sales_change_sensor",
        job=refresh_sales_job,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Re-materializes sales when the sales files change (their keys, ETags or sizes).",
    )
    def sales_change_sensor(context: SensorEvaluationContext, storage: StorageResource) -> SensorResult | SkipReason:
        fingerprint = listing_fingerprint(list_sales_files(storage.sales()))
        if fingerprint == context.cursor:
            return SkipReason("sales files unchanged")
        return SensorResult(run_requests=[RunRequest(run_key=f"sales:{fingerprint}")], cursor=fingerprint)

    return sales_change_sensor


@asset_sensor(
    name="sales_rejoin_sensor",
    asset_key=AssetKey(tables.SALES),
    job=rejoin_sales_job,
    default_status=DefaultSensorStatus.RUNNING,
    description="After sales is materialized, re-joins every partition that has thumbnails (no vector is recomputed).",
)
def sales_rejoin_sensor(context: SensorEvaluationContext, asset_event: EventLogEntry) -> SensorResult | SkipReason:
    metadata = asset_event.asset_materialization.metadata if asset_event.asset_materialization else {}
    duplicated = metadata.get(DUPLICATED_IMAGE_IDS_KEY)
    if duplicated is not None and duplicated.value:
        # The blocking check failed: joining now would multiply rows in every partition.
        return SkipReason(f"sales holds {duplicated.value} duplicated image_ids; fix the export, then sales is re-read")
    materialized = context.instance.get_materialized_partitions(AssetKey(tables.DOWNSCALED_IMAGES))
    return SensorResult(
        run_requests=[
            RunRequest(run_key=f"sales-{asset_event.run_id}:{prefix}", partition_key=prefix)
            for prefix in sorted(materialized)
        ]
    )


def _report_root_objects(context: SensorEvaluationContext, names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:_ROOT_OBJECTS_SHOWN]) + (" ..." if len(names) > _ROOT_OBJECTS_SHOWN else "")
        context.log.warning(
            f"{len(names)} objects lie directly under the raw-images root and belong to no partition: {shown}"
        )
