"""Backfilling what is missing: which asset partitions to run, and two ways to run them.

`plan_backfill` decides, for every registered prefix, the first table of the
prefix chain that must be (re)written — its own materialization is missing or
stale (written before its upstream last changed: a run failed in between,
see `staleness.py`), or `sales` is refreshed first (missing, or its files changed since it was last
read), which makes every joined table stale — and that table and everything
below it up to the target are in the plan.

`run_in_process` executes the plan in this process without a daemon: one run
per chunk of at most `max_partitions_per_run` consecutive prefixes, one after
the other (never more than one run in flight), the first run also refreshing
`sales` when the plan needs it (Dagster orders it before the join; if its
blocking check fails, the join is skipped and no later chunk is run).

`submit_asset_backfill` hands the prefixes to a running daemon as one asset
backfill, as the UI's "Materialize" of missing partitions does. The daemon runs
it in chunks (the assets' `BackfillPolicy`) through the instance's run queue.
`sales` is refreshed here first (one small run): in the same backfill, the
daemon would split each chunk into a run before the join and one after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.utils import make_new_backfill_id

from imgemb_assets.core.ingest.discovery import listing_fingerprint
from imgemb_assets.core.lake import tables
from imgemb_assets.core.sales.join import list_sales_files
from imgemb_assets.core.storage.names import partition_key_problem
from imgemb_assets.core.storage.objects import ObjectStore
from imgemb_assets.dagster_wiring.location.recorded_metadata import recorded_fingerprint
from imgemb_assets.dagster_wiring.location.staleness import PartitionStatus, partition_status
from imgemb_assets.dagster_wiring.location.unfinished_runs import unfinished_runs_by_prefix
from imgemb_assets.dagster_wiring.names import (
    LAUNCHED_BY_TAG,
    RAW_IMAGES,
    S3_PREFIX_PARTITIONS_NAME,
    SALES_FILES_FINGERPRINT_KEY,
    SALES_JOB_NAME,
)

# The partitioned tables in the order they are computed; each step writes the
# tables of its group (downscaled_images and rejected_images come together).
PREFIX_CHAIN: Final = (
    (tables.RAW_IMAGE_MANIFEST,),
    (tables.DOWNSCALED_IMAGES, tables.REJECTED_IMAGES),
    (tables.IMAGES_WITH_SALES,),
    (tables.IMAGE_EMBEDDINGS,),
)
_JOINED_STEP: Final = 2  # images_with_sales: the first table that reads sales
_TAGS: Final = {LAUNCHED_BY_TAG: "backfill-missing"}
# Runs here print warnings and errors; every event is in the instance (and the UI).
QUIET_CONSOLE: Final = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# A daemon that has not written a heartbeat for this long is not running
# (it writes one every 30 s; Dagster's own tolerance is half an hour).
_DAEMON_HEARTBEAT_MAX_AGE_S: Final = 90


@dataclass(frozen=True)
class BackfillPlan:
    """What to run: `sales` or not, and each prefix's tables (a suffix of the chain up to the target)."""

    refresh_sales: bool
    sales_reason: str
    tables_by_prefix: Mapping[str, tuple[str, ...]]  # in registration order
    skipped_in_progress: Sequence[str] = field(default_factory=tuple)
    # registered keys that are no valid prefix ('' from '<root>//' before it was refused) -> why
    skipped_invalid: Mapping[str, str] = field(default_factory=dict)

    @property
    def prefixes(self) -> list[str]:
        return list(self.tables_by_prefix)

    @property
    def empty(self) -> bool:
        return not self.refresh_sales and not self.tables_by_prefix


def chain_up_to(target: str) -> list[tuple[str, ...]]:
    """The chain's steps from the first one to the step that writes `target`."""
    for index, group in enumerate(PREFIX_CHAIN):
        if target in group:
            return list(PREFIX_CHAIN[: index + 1])
    raise ValueError(f"{target!r} is not a partitioned table; choose one of {[t for g in PREFIX_CHAIN for t in g]}")


def sales_staleness(instance: dg.DagsterInstance, sales_store: ObjectStore) -> str | None:
    """Why `sales` must be read again before joining (missing, or its files changed), or None."""
    if not instance.get_latest_materialization_event(dg.AssetKey(tables.SALES)):
        return "sales has never been materialized"
    recorded = recorded_fingerprint(instance, tables.SALES, SALES_FILES_FINGERPRINT_KEY)
    if recorded != listing_fingerprint(list_sales_files(sales_store)):
        return "the sales files changed since sales was last materialized"
    return None


def not_current_by_step(
    instance: dg.DagsterInstance, steps: Sequence[tuple[str, ...]], prefixes: Sequence[str]
) -> list[PartitionStatus]:
    """For each step of the chain, the prefixes its table lacks or wrote before its upstream last changed."""
    statuses = []
    for index, group in enumerate(steps):
        upstream = RAW_IMAGES if index == 0 else steps[index - 1][0]
        whole = [tables.SALES] if index == _JOINED_STEP else []
        statuses.append(partition_status(instance, group[0], [upstream], whole, prefixes))
    return statuses


def plan_backfill(
    instance: dg.DagsterInstance, target: str, sales_store: ObjectStore, *, skip_unfinished_runs: bool = False
) -> BackfillPlan:
    """What to run for `target`; with `skip_unfinished_runs`, prefixes a queued or running run writes are left to it.

    Only where a daemon runs: its run monitor ends the runs whose process died, so such
    prefixes are not left behind for good.
    """
    steps = chain_up_to(target)
    registered = list(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    # Missing, or stale (a run failed after its upstream changed): what automation would run too.
    statuses = not_current_by_step(instance, steps, registered)
    not_current = [set(status.not_current) for status in statuses]
    sales_reason = sales_staleness(instance, sales_store) if len(steps) > _JOINED_STEP else None
    # Prefixes with no thumbnails yet have joined nothing with the old sales.
    never_downscaled = set(statuses[_JOINED_STEP - 1].missing) if sales_reason is not None else set()
    in_progress = _targeted_by_running_backfills(instance, target)
    if skip_unfinished_runs:
        in_progress |= _targeted_by_unfinished_runs(instance, target, registered)
    tables_by_prefix: dict[str, tuple[str, ...]] = {}
    # A run for '' would list the whole root as one partition: such keys are never run.
    invalid = {prefix: problem for prefix in registered if (problem := partition_key_problem(prefix)) is not None}
    for prefix in registered:
        if prefix in invalid:
            continue
        first = next((index for index, lacking in enumerate(not_current) if prefix in lacking), len(steps))
        if sales_reason is not None and prefix not in never_downscaled:
            first = min(first, _JOINED_STEP)  # joined with the old sales: join again
        if first < len(steps) and prefix not in in_progress:
            tables_by_prefix[prefix] = tuple(table for group in steps[first:] for table in group)
    return BackfillPlan(
        refresh_sales=sales_reason is not None,
        sales_reason=sales_reason or "",
        tables_by_prefix=tables_by_prefix,
        skipped_in_progress=sorted(in_progress & set(registered)),
        skipped_invalid=invalid,
    )


def daemon_is_running(instance: dg.DagsterInstance) -> bool:
    """Whether a daemon with a backfill loop wrote a heartbeat recently."""
    heartbeat = instance.get_daemon_heartbeats().get("BACKFILL")
    return heartbeat is not None and time.time() - heartbeat.timestamp < _DAEMON_HEARTBEAT_MAX_AGE_S


@dataclass(frozen=True)
class RunChunk:
    """One run: consecutive registered prefixes that need the same tables."""

    tables: tuple[str, ...]
    prefixes: tuple[str, ...]


def run_chunks(plan: BackfillPlan, registered: Sequence[str], max_per_run: int) -> list[RunChunk]:
    """The plan as runs over ranges of registered prefixes, each at most `max_per_run` long.

    A run covers a range of the registered order, so a range never spans a
    prefix that needs other tables (or none).
    """
    chunks: list[RunChunk] = []
    current: list[str] = []
    current_tables: tuple[str, ...] = ()
    for prefix in registered:
        wanted = plan.tables_by_prefix.get(prefix, ())
        if current and (wanted != current_tables or len(current) == max_per_run):
            chunks.append(RunChunk(current_tables, tuple(current)))
            current = []
        if wanted:
            current.append(prefix)
            current_tables = wanted
    if current:
        chunks.append(RunChunk(current_tables, tuple(current)))
    return chunks


@dataclass(frozen=True)
class RunOutcome:
    run_id: str
    chunk: RunChunk | None  # None: a run of sales alone
    success: bool
    with_sales: bool = False


def refresh_sales_in_process(instance: dg.DagsterInstance, defs: dg.Definitions) -> RunOutcome:
    result = defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(
        instance=instance, tags=_TAGS, run_config=QUIET_CONSOLE, raise_on_error=False
    )
    return RunOutcome(result.run_id, None, result.success)


def run_in_process(
    instance: dg.DagsterInstance, defs: dg.Definitions, plan: BackfillPlan, max_per_run: int
) -> Iterator[RunOutcome]:
    """Executes the plan here, one run at a time; stops after a run whose sales step did not succeed."""
    chunks = run_chunks(plan, list(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)), max_per_run)
    if plan.refresh_sales and not chunks:
        yield refresh_sales_in_process(instance, defs)
        return
    # The job the UI and backfills use for asset selections: any assets, one range of prefixes.
    assets_job = defs.resolve_implicit_global_asset_job_def()
    for index, chunk in enumerate(chunks):
        with_sales = plan.refresh_sales and index == 0
        result = assets_job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(table) for table in ((tables.SALES,) if with_sales else ()) + chunk.tables],
            tags={
                **_TAGS,
                ASSET_PARTITION_RANGE_START_TAG: chunk.prefixes[0],
                ASSET_PARTITION_RANGE_END_TAG: chunk.prefixes[-1],
            },
            run_config=QUIET_CONSOLE,
            raise_on_error=False,
        )
        yield RunOutcome(result.run_id, chunk, result.success, with_sales)
        if with_sales and not result.is_node_success(tables.SALES):
            return  # every later chunk would join a missing or unusable sales table


def submit_asset_backfill(instance: dg.DagsterInstance, defs: dg.Definitions, plan: BackfillPlan) -> str:
    """Adds the plan's prefixes as one asset backfill for the daemon; its id. Refresh `sales` first."""
    wanted = {
        AssetKeyPartitionKey(dg.AssetKey(table), prefix)
        for prefix, prefix_tables in plan.tables_by_prefix.items()
        for table in prefix_tables
    }
    backfill_id = make_new_backfill_id()
    instance.add_backfill(
        PartitionBackfill.from_asset_graph_subset(
            backfill_id=backfill_id,
            backfill_timestamp=time.time(),
            tags=_TAGS,
            dynamic_partitions_store=instance,
            asset_graph_subset=AssetGraphSubset.from_asset_partition_set(wanted, defs.resolve_asset_graph()),
            title="imgemb backfill-missing",
            description=None,
            run_config=None,
        )
    )
    return backfill_id


def _targeted_by_running_backfills(instance: dg.DagsterInstance, target: str) -> set[str]:
    """Prefixes whose `target` partition a backfill still in progress will write."""
    targeted: set[str] = set()
    running = instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED]))
    for backfill in running:
        data = backfill.asset_backfill_data
        if data is None or dg.AssetKey(target) not in data.target_subset.partitions_subsets_by_asset_key:
            continue
        targeted |= set(data.target_subset.partitions_subsets_by_asset_key[dg.AssetKey(target)].get_partition_keys())
    return targeted


def _targeted_by_unfinished_runs(instance: dg.DagsterInstance, target: str, registered: Sequence[str]) -> set[str]:
    """Prefixes whose `target` partition a queued or running run will write (one the discovery sensor launched
    for new prefixes, automation's, the UI's): a backfill of them now would write them a second time."""
    return set(unfinished_runs_by_prefix(instance, registered, [target]))
