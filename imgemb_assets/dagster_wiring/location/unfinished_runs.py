"""Which prefixes the queued and running runs will write, read from their tags.

A run writes a single prefix (`dagster/partition`) or a range of the registered
order (`dagster/asset_partition_range_start` .. `_end`), and the assets of its
asset selection (every asset of its job when it has none). Used by
`imgemb backfill-missing` to leave such prefixes to their run, and by
`remove_vanished_prefixes` to wait for the runs writing a prefix before its rows go.
"""

from collections.abc import Collection, Mapping, Sequence

import dagster as dg
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES, DagsterRun
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)


def unfinished_runs_by_prefix(
    instance: dg.DagsterInstance,
    order: Sequence[str],
    assets: Collection[str],
    exclude_run_ids: Collection[str] = (),
    statuses: Sequence[dg.DagsterRunStatus] = NOT_FINISHED_STATUSES,
) -> dict[str, set[str]]:
    """For each prefix that runs in `statuses` (by default queued or running) write, those runs' ids.

    Only runs that may write one of `assets` count.

    `order` is the registered order that the runs' ranges were cut from: pass the order read before
    any partition was deleted, or a range spanning a deleted prefix would no longer cover it.
    """
    position = {prefix: index for index, prefix in enumerate(order)}
    keys = {dg.AssetKey(asset) for asset in assets}
    writers: dict[str, set[str]] = {}
    for record in instance.get_run_records(dg.RunsFilter(statuses=list(statuses))):
        run = record.dagster_run
        if run.run_id in exclude_run_ids or not _writes_any(run, keys):
            continue
        for prefix in _prefixes_of(run.tags, order, position):
            writers.setdefault(prefix, set()).add(run.run_id)
    return writers


def _writes_any(run: DagsterRun, keys: set[dg.AssetKey]) -> bool:
    # No asset selection: a job's own assets, which may be any of them.
    return run.asset_selection is None or not keys.isdisjoint(run.asset_selection)


def _prefixes_of(tags: Mapping[str, str], order: Sequence[str], position: Mapping[str, int]) -> list[str]:
    prefixes = [single] if (single := tags.get(PARTITION_NAME_TAG)) is not None else []
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if start is not None and end is not None and start in position and end in position:
        prefixes += order[position[start] : position[end] + 1]
    return prefixes
