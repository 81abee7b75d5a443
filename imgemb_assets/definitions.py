"""The code location: assembles Definitions and nothing else.

`defs` is built when Dagster loads the location (not when this module is
imported), from the deployment settings in the environment; tests build their
own with `build_definitions`. The IMGEMB_* roots and weights are Dagster
`EnvVar`s, read when each run starts. Each domain of `dagster_wiring` builds its
own definitions; this module merges them and adds what the whole location shares
(the resources, the executor, the automation sensor).
"""

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

from imgemb_assets.dagster_wiring.embedding.definitions import build_embedding_defs
from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
from imgemb_assets.dagster_wiring.evaluation.definitions import build_evaluation_defs
from imgemb_assets.dagster_wiring.ingest.definitions import build_ingest_defs
from imgemb_assets.dagster_wiring.ingest.resources import ImageLimitsResource
from imgemb_assets.dagster_wiring.lake.definitions import build_lake_defs
from imgemb_assets.dagster_wiring.location.automation import build_automation_sensor
from imgemb_assets.dagster_wiring.location.placement import location_executor
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, QualityThresholds, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.sales.definitions import build_sales_defs
from imgemb_assets.dagster_wiring.search.definitions import build_search_defs
from imgemb_assets.dagster_wiring.search.resources import SimilaritySettings

# Each builds one domain's assets, checks, jobs, sensors and schedules from the settings and the embedding
# model's code version (that of the assets made from its vectors); in the order of the domains.
_DOMAINS = (
    build_ingest_defs,
    build_sales_defs,
    build_embedding_defs,
    build_evaluation_defs,
    build_search_defs,
    build_lake_defs,
)


def default_resources(settings: LocationSettings | None = None) -> dict[str, Any]:
    """The resources the location ships with: roots and weights from IMGEMB_* variables (read when a run starts),
    the backbone from the settings (IMGEMB_MODEL, read when the location loads), defaults elsewhere."""
    settings = settings or LocationSettings()
    return {
        "storage": StorageResource(
            raw_images_uri=dg.EnvVar("IMGEMB_RAW_IMAGES_URI"),
            sales_uri=dg.EnvVar("IMGEMB_SALES_URI"),
            lake_uri=dg.EnvVar("IMGEMB_LAKE_URI"),
            # Endpoint, region and credentials come from the standard AWS variables and chain.
            s3=ImgembS3Resource(),
            partition_scheme=settings.partition_scheme,
        ),
        "embedding_model": EmbeddingModelResource(weights=dg.EnvVar("IMGEMB_MODEL_WEIGHTS"), model=settings.model),
        "image_limits": ImageLimitsResource(),
        "quality": QualityThresholds(),
        "similarity": SimilaritySettings(),
    }


def build_definitions(settings: LocationSettings, resources: Mapping[str, Any] | None = None) -> dg.Definitions:
    """The location's definitions; `resources` replace those of `default_resources()` they name (tests)."""
    location_resources = {**default_resources(settings), **(resources or {})}
    # Once per load: the weights' identity may hash a checkpoint of hundreds of MB.
    model_code_version = location_resources["embedding_model"].code_version()
    return dg.Definitions.merge(
        *(build_domain_defs(settings, model_code_version) for build_domain_defs in _DOMAINS),
        dg.Definitions(
            sensors=[build_automation_sensor(settings.automation_interval_s())],
            executor=location_executor(settings),
            resources=location_resources,
        ),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(LocationSettings.from_environ(os.environ))
