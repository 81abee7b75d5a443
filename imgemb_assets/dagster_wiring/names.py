"""Every Dagster name the wiring shares: asset keys, check names, jobs, sensors, pools, tags, metadata keys.

A domain's wiring, the sensors, the backfills and the tests refer to each other's
assets, checks and jobs by these names, so no wiring module imports another only for
a name. The Delta tables' names (which are also their assets' keys) live with their
schemas in `imgemb_assets.core.lake.tables`. Constants only: nothing here reads the
environment.
"""

from typing import Final

from imgemb_assets.core.lake import tables

# --- partitions
S3_PREFIX_PARTITIONS_NAME: Final = "s3_prefix"

# --- assets the pipeline reads but does not write (reported by the sensors)
RAW_IMAGES: Final = "raw_images"
SALES_EXPORT: Final = "sales_export"
SEARCH_INDEX: Final = "image_search_index"

# --- asset checks, each name used by its spec and by its result
MANIFEST_ACCOUNTED_FOR_CHECK: Final = "manifest_accounted_for"
UNIQUE_IMAGE_IDS_CHECK: Final = "unique_image_ids"
SALES_COVERAGE_CHECK: Final = "sales_coverage"
EMBEDDING_VALUES_CHECK: Final = "embedding_values"
EMBEDDING_DRIFT_CHECK: Final = "embedding_drift"
NEAR_DUPLICATE_SHARE_CHECK: Final = "near_duplicate_share"

# --- metadata keys
# On raw_images events and raw_image_manifest materializations: the prefix's listing.
LISTING_FINGERPRINT_KEY: Final = "listing_fingerprint"
# On sales_export events and sales materializations: the sales files' listing.
SALES_FILES_FINGERPRINT_KEY: Final = "sales_files_fingerprint"
# On each sales materialization: nothing joins a table with duplicated image_ids.
DUPLICATED_IMAGE_IDS_KEY: Final = "duplicated_image_ids"
# On raw_images events reported from the bucket's event queue: how many changed objects the partition had.
S3_EVENTS_KEY: Final = "s3_events"
# The embedding step's progress totals' metadata keys start with this (`progress_done`, `progress_total`, ...).
PROGRESS_METADATA_PREFIX: Final = "progress"

# --- jobs
SALES_JOB_NAME: Final = "refresh_sales"
PREFIX_JOB_NAME: Final = "embed_prefix"
REJOIN_JOB_NAME: Final = "rejoin_sales"
SEARCH_INDEX_JOB_NAME: Final = "refresh_search_index"
NEW_PREFIXES_JOB_NAME: Final = "embed_new_prefixes"
REMOVE_VANISHED_JOB_NAME: Final = "remove_vanished_prefixes"
MAINTENANCE_JOB_NAME: Final = "lake_maintenance"
# The maintenance job's first op: it refuses to start while other runs write the lake.
GUARD_OP_NAME: Final = "no_other_runs"

# The tables of one prefix, in the order they are written: every table but sales, then the evaluation.
PREFIX_CHAIN_ASSETS: Final = (
    *(name for name in tables.ALL_TABLES if name != tables.SALES),
    tables.EMBEDDING_EVALUATION,
)

# --- sensors and schedules
AUTOMATION_SENSOR_NAME: Final = "imgemb_automation"
RECONCILIATION_SENSOR_NAME: Final = "full_reconciliation_sensor"
MAINTENANCE_SCHEDULE_NAME: Final = "lake_maintenance_schedule"

# --- pools and run tags
GPU_POOL: Final = "gpu"
SEARCH_INDEX_POOL: Final = "search_index"
# Who launched a run (the discovery sensor, `imgemb backfill-missing`): on the run, for the UI and benchmarks.
LAUNCHED_BY_TAG: Final = "imgemb/launched_by"
LAUNCHED_BY_DISCOVERY: Final = "discovery"
