"""Jobs: the sales refresh, and everything one prefix needs, partitioned by prefix."""

from dagster import AssetSelection, define_asset_job

from imgemb_assets.core import tables
from imgemb_assets.defs.partitions import s3_prefix_partitions

SALES_JOB_NAME = "refresh_sales"
PREFIX_JOB_NAME = "embed_prefix"

refresh_sales_job = define_asset_job(
    SALES_JOB_NAME,
    selection=AssetSelection.assets(tables.SALES),
    description="Re-read and validate the sales export into the sales Delta table.",
)

embed_prefix_job = define_asset_job(
    PREFIX_JOB_NAME,
    selection=AssetSelection.assets(
        tables.RAW_IMAGE_MANIFEST,
        tables.DOWNSCALED_IMAGES,
        tables.REJECTED_IMAGES,
        tables.IMAGES_WITH_SALES,
        tables.IMAGE_EMBEDDINGS,
    ),
    partitions_def=s3_prefix_partitions,
    description="List, downscale, join and embed one prefix (requires the sales table).",
)
