"""Jobs: the sales refresh, and everything one prefix needs (partitioned by prefix, as its assets are)."""

from typing import Final

from dagster import AssetSelection, define_asset_job

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.similarity import SEARCH_INDEX

SALES_JOB_NAME = "refresh_sales"
PREFIX_JOB_NAME = "embed_prefix"

refresh_sales_job = define_asset_job(
    SALES_JOB_NAME,
    selection=AssetSelection.assets(tables.SALES),
    description="Re-read and validate the sales export into the sales Delta table.",
)

# The tables of one prefix, in the order they are written.
PREFIX_CHAIN_ASSETS: Final = (
    tables.RAW_IMAGE_MANIFEST,
    tables.DOWNSCALED_IMAGES,
    tables.REJECTED_IMAGES,
    tables.IMAGES_WITH_SALES,
    tables.IMAGE_EMBEDDINGS,
    tables.EMBEDDING_EVALUATION,
)

embed_prefix_job = define_asset_job(
    PREFIX_JOB_NAME,
    selection=AssetSelection.assets(*PREFIX_CHAIN_ASSETS),
    description="List, downscale, join, embed and evaluate one prefix (requires the sales table).",
)

REJOIN_JOB_NAME = "rejoin_sales"

rejoin_sales_job = define_asset_job(
    REJOIN_JOB_NAME,
    selection=AssetSelection.assets(tables.IMAGES_WITH_SALES, tables.IMAGE_EMBEDDINGS),
    description="Re-join one prefix with the current sales table; stored vectors are reused, not recomputed.",
)

SEARCH_INDEX_JOB_NAME = "refresh_search_index"

# Unpartitioned: it reads whichever partitions of image_embeddings changed since its last run.
search_index_job = define_asset_job(
    SEARCH_INDEX_JOB_NAME,
    selection=AssetSelection.assets(SEARCH_INDEX, tables.NEAR_DUPLICATES),
    description="Bring the similar-image index and the near-duplicate table up to image_embeddings.",
)

NEW_PREFIXES_JOB_NAME = "embed_new_prefixes"

# What the discovery sensor launches for the prefixes it registers (new_prefix_runs.py): their chain,
# with `sales` refreshed first when it must be (each run selects the assets it needs).
new_prefixes_job = define_asset_job(
    NEW_PREFIXES_JOB_NAME,
    selection=AssetSelection.assets(tables.SALES, *PREFIX_CHAIN_ASSETS),
    description="The whole chain of new prefixes, sales first when it must be refreshed (launched by raw_prefix_sensor).",
)
