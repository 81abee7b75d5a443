"""The ingest domain's definitions: its assets, the chain jobs, discovery and the rolling reconciliation."""

import dagster as dg

from imgemb_assets.dagster_wiring.ingest.assets import build_ingest_assets
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import build_raw_prefix_sensor
from imgemb_assets.dagster_wiring.ingest.jobs import embed_prefix_job, new_prefixes_job
from imgemb_assets.dagster_wiring.ingest.reconciliation import build_reconciliation_sensor
from imgemb_assets.dagster_wiring.location.partitions import prefix_backfill_policy
from imgemb_assets.dagster_wiring.location.settings import LocationSettings


def build_ingest_defs(settings: LocationSettings, model_code_version: str) -> dg.Definitions:
    """Listing, thumbnails and the discovery of prefixes; the vanished-prefix job comes with the discovery sensor."""
    return dg.Definitions(
        assets=build_ingest_assets(prefix_backfill_policy(settings)),
        jobs=[embed_prefix_job, new_prefixes_job],
        sensors=[
            build_raw_prefix_sensor(
                settings.discovery_interval_s(),
                settings.sensor_recent_prefixes,
                settings.sensor_max_new_prefixes,
                settings.vanished_prefixes,
                settings.s3_events_queue_url,
                settings.sensor_max_root_pages,
                settings.max_partitions_per_run,
            ),
            build_reconciliation_sensor(settings.reconciliation_interval_s, settings.reconciliation_prefixes_per_tick),
        ],
    )
