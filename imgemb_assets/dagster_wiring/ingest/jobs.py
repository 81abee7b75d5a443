"""The jobs of a prefix's whole chain, from its listing to its evaluation (partitioned by prefix, as its assets are)."""

import dagster as dg

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.names import NEW_PREFIXES_JOB_NAME, PREFIX_CHAIN_ASSETS, PREFIX_JOB_NAME

embed_prefix_job = dg.define_asset_job(
    PREFIX_JOB_NAME,
    selection=dg.AssetSelection.assets(*PREFIX_CHAIN_ASSETS),
    description="List, downscale, join, embed and evaluate one prefix (requires the sales table).",
)

# What the discovery sensor launches for the prefixes it registers (new_prefix_runs.py): their chain,
# with `sales` refreshed first when it must be (each run selects the assets it needs).
new_prefixes_job = dg.define_asset_job(
    NEW_PREFIXES_JOB_NAME,
    selection=dg.AssetSelection.assets(tables.SALES, *PREFIX_CHAIN_ASSETS),
    description="The whole chain of new prefixes, sales first when it must be refreshed (launched by raw_prefix_sensor).",
)
