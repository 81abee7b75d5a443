"""The runs the discovery sensor launches itself: the whole chain of the prefixes it registers.

Automation (`location/automation.py`) would request the same chain, but only on its own
next evaluation, and a request of many prefixes becomes a backfill that waits
for the backfill daemon's 30 s loop: up to a minute of waiting before any work.
A new prefix has nothing in flight and nothing written, so the sensor can launch
its chain at once, in the tick that registers it: runs of at most
`max_partitions_per_run` new prefixes (consecutive in the registration order, so
each run is one partition range), through the instance's run queue like any
other run. Automation then finds these partitions in progress, and once the run
has written them, updated after their `raw_images` report: it requests nothing
more for them (the search index and near duplicates follow as usual).

The chain needs the `sales` table. When `sales` is missing or older than the
last `sales_export` report, the first run refreshes it too (Dagster orders it
before the join). When a run refreshing `sales` is queued or in progress, or its blocking
check failed, the sensor launches nothing and leaves the prefixes to automation,
which waits for `sales` as it always does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.location.staleness import latest_unpartitioned_id
from imgemb_assets.dagster_wiring.names import (
    LAUNCHED_BY_DISCOVERY,
    LAUNCHED_BY_TAG,
    NEW_PREFIXES_JOB_NAME,
    PREFIX_CHAIN_ASSETS,
    SALES_EXPORT,
    UNIQUE_IMAGE_IDS_CHECK,
)


@dataclass(frozen=True)
class SalesReadiness:
    """Whether a chain may join now: `sales` usable as it is, usable once refreshed in the same run, or neither."""

    usable: bool
    refresh: bool
    reason: str


def _sales_in_progress(instance: dg.DagsterInstance) -> bool:
    for record in instance.get_run_records(dg.RunsFilter(statuses=NOT_FINISHED_STATUSES)):
        selection = record.dagster_run.asset_selection
        if selection is not None and dg.AssetKey(tables.SALES) in selection:
            return True
    return False


def _unique_ids_check_failed(instance: dg.DagsterInstance) -> bool:
    check = dg.AssetCheckKey(dg.AssetKey(tables.SALES), UNIQUE_IMAGE_IDS_CHECK)
    executions = instance.event_log_storage.get_asset_check_execution_history(check, limit=1)
    return bool(executions) and executions[0].status == AssetCheckExecutionRecordStatus.FAILED


def sales_readiness(instance: dg.DagsterInstance) -> SalesReadiness:
    if _sales_in_progress(instance):
        return SalesReadiness(False, False, "a run refreshing sales is queued or in progress")
    written = latest_unpartitioned_id(instance, tables.SALES)
    if written is None:
        return SalesReadiness(True, True, "sales was never materialized: the first run refreshes it")
    if _unique_ids_check_failed(instance):
        return SalesReadiness(False, False, f"the sales check {UNIQUE_IMAGE_IDS_CHECK} failed")
    export_id = latest_unpartitioned_id(instance, SALES_EXPORT)
    if export_id is not None and export_id > written:
        return SalesReadiness(True, True, "the sales files changed: the first run refreshes sales")
    return SalesReadiness(True, False, "sales is current")


def new_prefix_run_requests(
    new_prefixes: Sequence[str], max_per_run: int, readiness: SalesReadiness
) -> list[dg.RunRequest]:
    """One run per `max_per_run` new prefixes (in registration order), each the whole chain over its range."""
    if not new_prefixes or not readiness.usable:
        return []
    requests = []
    for start in range(0, len(new_prefixes), max_per_run):
        chunk = new_prefixes[start : start + max_per_run]
        with_sales = readiness.refresh and start == 0
        assets = ((tables.SALES,) if with_sales else ()) + PREFIX_CHAIN_ASSETS
        requests.append(
            dg.RunRequest(
                # The same chunk is never launched twice, should a tick be evaluated again.
                run_key=f"new-prefixes:{chunk[0]}..{chunk[-1]}",
                job_name=NEW_PREFIXES_JOB_NAME,
                asset_selection=[dg.AssetKey(asset) for asset in assets],
                tags={
                    LAUNCHED_BY_TAG: LAUNCHED_BY_DISCOVERY,
                    ASSET_PARTITION_RANGE_START_TAG: chunk[0],
                    ASSET_PARTITION_RANGE_END_TAG: chunk[-1],
                },
            )
        )
    return requests
