"""The sales domain's definitions: the sales table, the join, their jobs and the sales sensor."""

import dagster as dg

from imgemb_assets.dagster_wiring.location.partitions import prefix_backfill_policy
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.sales.assets import build_sales_assets
from imgemb_assets.dagster_wiring.sales.jobs import refresh_sales_job, rejoin_sales_job
from imgemb_assets.dagster_wiring.sales.sensor import build_sales_change_sensor


def build_sales_defs(settings: LocationSettings, model_code_version: str) -> dg.Definitions:
    return dg.Definitions(
        assets=build_sales_assets(prefix_backfill_policy(settings)),
        jobs=[refresh_sales_job, rejoin_sales_job],
        sensors=[build_sales_change_sensor(settings.automation_interval_s())],
    )
