"""The code location: assembles Definitions and nothing else.

Environment variables are named here but read by Dagster when a run starts.
"""

from dagster import Definitions, EnvVar

from imgemb_assets.defs.assets import (
    downscaled_images,
    image_embeddings,
    images_with_sales,
    raw_image_manifest,
    sales,
)
from imgemb_assets.defs.jobs import embed_prefix_job, refresh_sales_job, rejoin_sales_job
from imgemb_assets.defs.resources import EmbeddingModelResource, ImgembS3Resource, StorageResource
from imgemb_assets.defs.schedules import full_reconciliation_schedule
from imgemb_assets.defs.sensors import build_raw_prefix_sensor, sales_change_sensor, sales_rejoin_sensor

defs = Definitions(
    assets=[raw_image_manifest, downscaled_images, sales, images_with_sales, image_embeddings],
    jobs=[refresh_sales_job, embed_prefix_job, rejoin_sales_job],
    sensors=[build_raw_prefix_sensor(), sales_change_sensor, sales_rejoin_sensor],
    schedules=[full_reconciliation_schedule],
    resources={
        "storage": StorageResource(
            raw_images_uri=EnvVar("IMGEMB_RAW_IMAGES_URI"),
            sales_uri=EnvVar("IMGEMB_SALES_URI"),
            lake_uri=EnvVar("IMGEMB_LAKE_URI"),
            # Endpoint, region and credentials come from the standard AWS variables and chain.
            s3=ImgembS3Resource(),
        ),
        "embedding_model": EmbeddingModelResource(weights=EnvVar("IMGEMB_MODEL_WEIGHTS")),
    },
)
