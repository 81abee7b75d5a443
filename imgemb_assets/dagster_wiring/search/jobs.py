"""The search job: the similar-image index and the near-duplicate table, brought up to image_embeddings."""

import dagster as dg

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.names import SEARCH_INDEX, SEARCH_INDEX_JOB_NAME

# Unpartitioned: it reads whichever partitions of image_embeddings changed since its last run.
search_index_job = dg.define_asset_job(
    SEARCH_INDEX_JOB_NAME,
    selection=dg.AssetSelection.assets(SEARCH_INDEX, tables.NEAR_DUPLICATES),
    description="Bring the similar-image index and the near-duplicate table up to image_embeddings.",
)
