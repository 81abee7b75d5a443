"""The code location: assembles Definitions and nothing else.

`defs` is built when Dagster loads the location (not when this module is
imported), from the deployment settings in the environment; tests build their
own with `build_definitions`. The IMGEMB_* roots and weights are Dagster
`EnvVar`s, read when each run starts.
"""

import os
from collections.abc import Mapping
from typing import Any

from dagster import Definitions, EnvVar, definitions

from imgemb_assets.dagster_wiring.assets import build_assets
from imgemb_assets.dagster_wiring.automation import build_automation_sensor
from imgemb_assets.dagster_wiring.jobs import (
    embed_prefix_job,
    new_prefixes_job,
    refresh_sales_job,
    rejoin_sales_job,
    search_index_job,
)
from imgemb_assets.dagster_wiring.maintenance import build_maintenance_schedule
from imgemb_assets.dagster_wiring.placement import location_executor
from imgemb_assets.dagster_wiring.reconciliation import build_reconciliation_sensor
from imgemb_assets.dagster_wiring.resources import (
    EmbeddingModelResource,
    ImageLimitsResource,
    ImgembS3Resource,
    QualityThresholds,
    SimilaritySettings,
    StorageResource,
)
from imgemb_assets.dagster_wiring.sensors import build_raw_prefix_sensor, build_sales_change_sensor
from imgemb_assets.dagster_wiring.settings import LocationSettings


def default_resources(settings: LocationSettings | None = None) -> dict[str, Any]:
    """The resources the location ships with: roots and weights from IMGEMB_* variables, defaults elsewhere."""
    return {
        "storage": StorageResource(
            raw_images_uri=EnvVar("IMGEMB_RAW_IMAGES_URI"),
            sales_uri=EnvVar("IMGEMB_SALES_URI"),
            lake_uri=EnvVar("IMGEMB_LAKE_URI"),
            # Endpoint, region and credentials come from the standard AWS variables and chain.
            s3=ImgembS3Resource(),
            partition_scheme=(settings or LocationSettings()).partition_scheme,
        ),
        "embedding_model": EmbeddingModelResource(weights=EnvVar("IMGEMB_MODEL_WEIGHTS")),
        "image_limits": ImageLimitsResource(),
        "quality": QualityThresholds(),
        "similarity": SimilaritySettings(),
    }


def build_definitions(settings: LocationSettings, resources: Mapping[str, Any] | None = None) -> Definitions:
    """The location's definitions; `resources` replace those of `default_resources()` they name (tests)."""
    location_resources = {**default_resources(settings), **(resources or {})}
    return Definitions(
        assets=build_assets(settings, location_resources["embedding_model"].code_version()),
        jobs=[refresh_sales_job, embed_prefix_job, new_prefixes_job, rejoin_sales_job, search_index_job],
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
            build_sales_change_sensor(settings.automation_interval_s()),
            build_automation_sensor(settings.automation_interval_s()),
            build_reconciliation_sensor(settings.reconciliation_interval_s, settings.reconciliation_prefixes_per_tick),
        ],
        # Brings its job, lake_maintenance, which can be launched by hand while the schedule is off.
        schedules=[build_maintenance_schedule(settings)],
        executor=location_executor(settings),
        resources=location_resources,
    )


@definitions
def defs() -> Definitions:
    return build_definitions(LocationSettings.from_environ(os.environ))
