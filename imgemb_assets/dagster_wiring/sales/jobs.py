"""The sales jobs: refresh the sales table, and re-join a prefix with it."""

import dagster as dg

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.names import REJOIN_JOB_NAME, SALES_JOB_NAME

refresh_sales_job = dg.define_asset_job(
    SALES_JOB_NAME,
    selection=dg.AssetSelection.assets(tables.SALES),
    description="Re-read and validate the sales export into the sales Delta table.",
)

rejoin_sales_job = dg.define_asset_job(
    REJOIN_JOB_NAME,
    selection=dg.AssetSelection.assets(tables.IMAGES_WITH_SALES, tables.IMAGE_EMBEDDINGS),
    description="Re-join one prefix with the current sales table; stored vectors are reused, not recomputed.",
)
