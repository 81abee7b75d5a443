"""The one partitioning scheme: a partition is a first-level prefix under the raw-images root."""

from collections.abc import Sequence
from typing import Any

import dagster as dg

from imgemb_assets.core.lake.errors import PartitionRemovedError
from imgemb_assets.core.lake.lake import Precondition
from imgemb_assets.dagster_wiring.location.automation import FOLLOWS_UPSTREAM
from imgemb_assets.dagster_wiring.location.retries import STEP_RETRY_POLICY
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME

s3_prefix_partitions = dg.DynamicPartitionsDefinition(name=S3_PREFIX_PARTITIONS_NAME)


def prefix_backfill_policy(settings: LocationSettings) -> dg.BackfillPolicy:
    """Runs of a partitioned asset cover at most `settings.max_partitions_per_run` prefixes."""
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=settings.max_partitions_per_run)


def per_prefix_asset(
    policy: dg.BackfillPolicy, automation: dg.AutomationCondition = FOLLOWS_UPSTREAM
) -> dict[str, Any]:
    """What every asset with one partition per prefix passes to `@asset`: its partitions, runs, automation, retries."""
    return {
        "partitions_def": s3_prefix_partitions,
        "backfill_policy": policy,
        "automation_condition": automation,
        "retry_policy": STEP_RETRY_POLICY,
    }


def register_prefixes(instance: dg.DagsterInstance, prefixes: Sequence[str], register: bool = True) -> list[str]:
    """The prefixes not yet registered as partitions, registered (unless `register` is false: a dry run)."""
    known = set(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    added = [prefix for prefix in dict.fromkeys(prefixes) if prefix not in known]
    if added and register:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, added)
    return added


def still_registered(instance: dg.DagsterInstance, prefix: str) -> Precondition:
    """A write precondition: the prefix is still a registered partition (checked before each commit attempt).

    remove_vanished_prefixes unregisters a prefix before it deletes its rows, and waits for the runs
    already writing it; a run that reaches its commit after the prefix left could otherwise bring back
    rows that nothing would ever remove.
    """

    def check() -> None:
        if not instance.has_dynamic_partition(S3_PREFIX_PARTITIONS_NAME, prefix):
            raise PartitionRemovedError(
                f"prefix {prefix!r} is no longer a registered partition (remove_vanished_prefixes removed it while "
                "this run computed it): nothing was written"
            )

    return check
