"""The rolling reconciliation: every registered prefix, a bounded share per tick, against what was last reported.

The discovery sensor re-lists only new and recent prefixes. This sensor walks
all registered prefixes in name order, `prefixes_per_tick` at a time, wrapping
around, so a change the discovery sensor cannot see (an old prefix edited, a
prefix emptied or deleted) is found within one pass. It launches no run: like
the discovery sensor, it reports a new `raw_images` materialization for each
prefix whose listing differs from the last one reported, and automation
materializes it. A listing that returns to an earlier state (an upload then
deleted, a rollback) differs from the last report, so it is followed like any
other change; nothing is keyed on a fingerprint seen before.
"""

from collections.abc import Sequence

import dagster as dg

from imgemb_assets.core.ingest.discovery import fingerprint_prefixes
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.storage.names import partition_key_problem
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import known_prefixes
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.names import (
    LISTING_FINGERPRINT_KEY,
    RAW_IMAGES,
    RECONCILIATION_SENSOR_NAME,
    S3_PREFIX_PARTITIONS_NAME,
)


def next_window(registered: Sequence[str], after: str | None, size: int) -> list[str]:
    """The `size` registered prefixes that follow `after` in name order, wrapping around to the start."""
    ordered = sorted(registered)
    start = 0 if after is None else next((i for i, prefix in enumerate(ordered) if prefix > after), 0)
    return (ordered[start:] + ordered[:start])[: min(size, len(ordered))]


def _in_a_folder(root: PartitionedRoot, partition_key: str) -> bool:
    """A partition of the scheme that lies in a partition folder. Loose-object buckets are left to discovery,
    whose every pass (one tick, or several on a huge root) already lists all the loose objects."""
    return root.scheme.is_partition_key(partition_key) and root.scheme.place_of(partition_key).folder is not None


def build_reconciliation_sensor(minimum_interval_seconds: int, prefixes_per_tick: int) -> dg.SensorDefinition:
    @dg.sensor(
        name=RECONCILIATION_SENSOR_NAME,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Re-lists {prefixes_per_tick} registered prefixes per tick, in turn, and reports raw_images changed "
            "for each whose listing differs from the last one reported (changed, emptied or deleted); "
            "automation materializes them."
        ),
    )
    def full_reconciliation_sensor(
        context: dg.SensorEvaluationContext, storage: StorageResource
    ) -> dg.SensorResult | dg.SkipReason:
        # A key an earlier version registered ('' from '<root>//') is never listed: it would list the whole root.
        root = storage.partitioned_root()
        registered = [
            prefix
            for prefix in context.instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)
            if partition_key_problem(prefix) is None and _in_a_folder(root, prefix)
        ]
        window = next_window(registered, context.cursor or None, prefixes_per_tick)
        if not window:
            return dg.SkipReason("no registered prefixes")
        # Batched event-log queries for the whole window (one per prefix cost 4 s a tick on
        # PostgreSQL): the last report, else the manifest's fingerprint, as discovery compares.
        reported = known_prefixes(context.instance, window).fingerprints_of(window)
        fingerprints, errors = fingerprint_prefixes(root, window)
        for prefix, error in errors.items():  # one prefix that cannot be listed does not stop the others
            context.log.warning(f"prefix {prefix!r} could not be listed (tried again next pass): {error}")
        changed = {prefix: fp for prefix, fp in fingerprints.items() if fp != reported.get(prefix)}
        return dg.SensorResult(
            asset_events=[
                dg.AssetMaterialization(asset_key=RAW_IMAGES, partition=prefix, metadata={LISTING_FINGERPRINT_KEY: fp})
                for prefix, fp in changed.items()
            ],
            cursor=window[-1],
        )

    return full_reconciliation_sensor
