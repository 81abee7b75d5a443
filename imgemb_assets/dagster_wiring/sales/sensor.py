"""The sales sensor: reports `sales_export` changed when the sales files change; automation follows."""

import dagster as dg

from imgemb_assets.core.ingest.discovery import listing_fingerprint
from imgemb_assets.core.lake import tables
from imgemb_assets.core.sales.join import list_sales_files
from imgemb_assets.dagster_wiring.location.recorded_metadata import recorded_fingerprint
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.location.settings import DEFAULT_MINIMUM_INTERVAL_S
from imgemb_assets.dagster_wiring.names import SALES_EXPORT, SALES_FILES_FINGERPRINT_KEY


def build_sales_change_sensor(minimum_interval_seconds: int = DEFAULT_MINIMUM_INTERVAL_S) -> dg.SensorDefinition:
    @dg.sensor(
        name="sales_change_sensor",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Reports sales_export changed when the sales files change (their keys, ETags or sizes); "
        "automation re-materializes sales, then re-joins every prefix.",
    )
    def sales_change_sensor(
        context: dg.SensorEvaluationContext, storage: StorageResource
    ) -> dg.SensorResult | dg.SkipReason:
        fingerprint = listing_fingerprint(list_sales_files(storage.sales()))
        last_seen = context.cursor or recorded_fingerprint(context.instance, tables.SALES, SALES_FILES_FINGERPRINT_KEY)
        if fingerprint == last_seen:
            return dg.SkipReason("sales files unchanged")
        return dg.SensorResult(
            asset_events=[
                dg.AssetMaterialization(asset_key=SALES_EXPORT, metadata={SALES_FILES_FINGERPRINT_KEY: fingerprint})
            ],
            cursor=fingerprint,
        )

    return sales_change_sensor
