"""The daily full reconciliation: every registered prefix against what its last manifest recorded."""

from collections.abc import Iterator

from dagster import DefaultScheduleStatus, RunRequest, ScheduleEvaluationContext, schedule

from imgemb_assets.core import tables
from imgemb_assets.core.discovery import listing_fingerprint
from imgemb_assets.defs.assets import LISTING_FINGERPRINT_KEY
from imgemb_assets.defs.jobs import embed_prefix_job
from imgemb_assets.defs.partitions import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.defs.resources import StorageResource
from imgemb_assets.defs.sensors import recorded_fingerprint

DEFAULT_RECONCILIATION_CRON = "0 3 * * *"


@schedule(
    name="full_reconciliation_schedule",
    cron_schedule=DEFAULT_RECONCILIATION_CRON,
    job=embed_prefix_job,
    default_status=DefaultScheduleStatus.RUNNING,
    description=(
        "Fingerprints every registered prefix and requests a run where the listing differs from the one its "
        "last raw_image_manifest recorded (changed, emptied, or never materialized successfully)."
    ),
)
def full_reconciliation_schedule(context: ScheduleEvaluationContext, storage: StorageResource) -> Iterator[RunRequest]:
    store = storage.raw_images()
    for prefix in sorted(context.instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)):
        fingerprint = listing_fingerprint(store.list_objects(prefix))
        if fingerprint != recorded_fingerprint(context.instance, tables.RAW_IMAGE_MANIFEST, LISTING_FINGERPRINT_KEY, prefix):
            yield RunRequest(run_key=f"reconcile:{prefix}:{fingerprint}", partition_key=prefix)
