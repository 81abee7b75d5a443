"""Prefixes that vanish from the root: reported, and by a setting removed from every table and the instance.

A prefix exists while it holds objects. The discovery sensor compares the
prefixes it lists with the registered partitions on every tick; a registered
prefix that is no longer listed has vanished. With IMGEMB_VANISHED_PREFIXES=keep
(the default) the sensor reports it (once per change of the vanished set) and it
stays registered; the rolling reconciliation then sees its empty listing and
automation empties its partitions, so the tables follow the bucket. With
`remove`, the sensor requests a run of `remove_vanished_prefixes`, which checks
again that each prefix holds no object, deletes the partition from the
instance (no new run can be requested for it), waits for the running runs that
write it to end, and deletes its rows from every partitioned table
(one Delta commit per table): Dagster's data-retention pattern.

No run can bring the rows back: every partition write checks, just before each
commit attempt, that its prefix is still registered (`partitions.still_registered`),
so a run that reaches its commit after the removal writes nothing; and one that
passed that check before is among the runs waited for, so its commit lands
before the rows are deleted. A run still writing after the wait keeps its
prefix's rows; the step fails naming it, and a rerun with the same prefixes
(unregistered ones included) finishes the removal. The UI's partition status counts registered partitions only, so its
counts stay true; the event log keeps the removed prefix's history (Dagster's
open-source storages cannot wipe single partitions), and readers of earlier
table versions keep theirs until a vacuum past the retention.

A listing that suddenly misses most prefixes is more likely a wrong root, an
expired credential or an unmounted disk than a mass deletion: the sensor then
refuses to request any removal and says why.
"""

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Final

import dagster as dg
from dagster._core.storage.dagster_run import ACTIVE_RUN_STATUSES
from pydantic import Field

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.location.retries import permanent_failures
from imgemb_assets.dagster_wiring.location.unfinished_runs import unfinished_runs_by_prefix
from imgemb_assets.dagster_wiring.names import REMOVE_VANISHED_JOB_NAME, S3_PREFIX_PARTITIONS_NAME

# More than this share of the registered prefixes vanishing in one listing is refused.
MAX_VANISHED_SHARE: Final = 0.5
_SHOWN: Final = 10
# A removal waits this long for the runs still writing a removed prefix (an embedding step of a big
# prefix takes minutes), polling the run storage every few seconds.
DEFAULT_WAIT_FOR_RUNS_S: Final = 3600.0
_RUNS_POLL_S: Final = 2.0

PARTITIONED_TABLES: Final = tuple(name for name in (*tables.ALL_TABLES, *tables.DERIVED_TABLES) if name != tables.SALES)


def shown(prefixes: Sequence[str]) -> str:
    return ", ".join(repr(prefix) for prefix in prefixes[:_SHOWN]) + (" ..." if len(prefixes) > _SHOWN else "")


def removal_refusal(vanished: Sequence[str], registered_count: int) -> str | None:
    """Why no removal may be requested for this many vanished prefixes at once, or None."""
    if registered_count and len(vanished) > MAX_VANISHED_SHARE * registered_count:
        return (
            f"{len(vanished)} of {registered_count} registered prefixes are missing from the root's listing at once; "
            "that looks like a wrong root, expired credentials or an unmounted disk, not deletions, so nothing is "
            f"removed (remove them with a run of {REMOVE_VANISHED_JOB_NAME} if they really are gone)"
        )
    return None


def removal_request(vanished: Sequence[str]) -> dg.RunRequest:
    """A run of remove_vanished_prefixes for these prefixes; the same set is requested once."""
    digest = hashlib.sha256("\0".join(sorted(vanished)).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return dg.RunRequest(
        run_key=f"{REMOVE_VANISHED_JOB_NAME}:{digest}",
        job_name=REMOVE_VANISHED_JOB_NAME,
        run_config={"ops": {"remove_prefixes": {"config": {"prefixes": sorted(vanished)}}}},
    )


class RemovePrefixesConfig(dg.Config):
    prefixes: list[str]
    wait_for_runs_s: float = Field(
        default=DEFAULT_WAIT_FOR_RUNS_S,
        description="How long to wait for queued or running runs that write a removed prefix before its rows go; "
        "past it, those prefixes' rows stay (the prefixes stay unregistered) and the step fails naming the runs.",
    )


@dg.op(name="remove_prefixes")
def remove_prefixes(
    context: dg.OpExecutionContext, config: RemovePrefixesConfig, storage: StorageResource
) -> dg.Output[None]:
    lake = storage.lake()
    still_there = set(storage.partitioned_root().current_partitions())
    # The order the runs' ranges were cut from, read before any partition leaves it.
    order = list(context.instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    # A prefix not registered any more is removable too: an earlier removal unregistered it and
    # could not yet delete its rows (a run kept writing it past the wait).
    removable = sorted(p for p in set(config.prefixes) if p not in still_there)
    kept = sorted(set(config.prefixes) - set(removable))
    if kept:
        context.log.warning(f"left as they are (objects back under the root): {shown(kept)}")
    for prefix in set(removable) & set(order):
        # The partition leaves the instance first: nothing requests it any more, and every write of it
        # from now on fails its precondition (`still_registered`) instead of committing.
        context.instance.delete_dynamic_partition(S3_PREFIX_PARTITIONS_NAME, prefix)
    # A run past that precondition may still commit: its rows go only once it has ended.
    busy = _wait_for_writers(context, removable, order, config.wait_for_runs_s)
    # Objects uploaded again meanwhile: the sensor registered the prefix anew and its runs rewrite it.
    came_back = [prefix for prefix in removable if _registered(context, prefix)]
    if came_back:
        context.log.warning(f"registered again while they were being removed, so left as they are: {shown(came_back)}")
    emptied = [prefix for prefix in removable if prefix not in busy and prefix not in came_back]
    rows_removed: dict[str, int] = {name: 0 for name in PARTITIONED_TABLES}
    with permanent_failures():  # S3 denying the lake: one line, not retried
        for prefix in emptied:
            for name in PARTITIONED_TABLES:
                rows_removed[name] += lake.delete_partition(name, prefix)
        # A pair is two images: one whose other side left goes too, from whichever partition holds it.
        pairs_removed = lake.delete_rows_where_in(tables.NEAR_DUPLICATES, "other_prefix", emptied)
    if emptied:
        context.log.info(f"removed {len(emptied)} vanished prefixes: {shown(emptied)}")
    if busy:
        raise dg.Failure(
            description=f"{len(busy)} prefixes were unregistered but their rows are left, as runs still write them "
            f"after {config.wait_for_runs_s:g} s: {_runs_shown(busy)}; run {REMOVE_VANISHED_JOB_NAME} again with the "
            "same prefixes once those runs have ended",
            metadata={
                "prefixes_removed": dg.MetadataValue.json(emptied),
                "prefixes_left_to_runs": dg.MetadataValue.json(sorted(busy)),
            },
        )
    return dg.Output(
        None,
        metadata={
            "prefixes_removed": dg.MetadataValue.json(emptied),
            "prefixes_left": dg.MetadataValue.json(kept),
            **{f"rows_removed/{name}": rows for name, rows in rows_removed.items()},
            "near_duplicates_removed_with_their_other_side": pairs_removed,
        },
    )


def _wait_for_writers(
    context: dg.OpExecutionContext, prefixes: Sequence[str], order: Sequence[str], timeout_s: float
) -> dict[str, set[str]]:
    """Waits until no running run writes any of `prefixes`; those still written after `timeout_s` -> run ids.

    Only runs that have started can be past their precondition: a queued one checks it when it
    writes, after the partition left. Waiting for queued runs too would wait out the whole timeout
    whenever the run queue is full (the removal holds one of its slots).
    """
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        writers = unfinished_runs_by_prefix(
            context.instance, order, PARTITIONED_TABLES, exclude_run_ids={context.run_id}, statuses=ACTIVE_RUN_STATUSES
        )
        # A prefix registered again is not removed: the runs writing it then are not waited for.
        wanted = {prefix for prefix in prefixes if not _registered(context, prefix)}
        busy = {prefix: runs for prefix, runs in writers.items() if prefix in wanted}
        if not busy or time.monotonic() >= deadline:
            return busy
        if not said:
            context.log.info(f"waiting for runs that write prefixes being removed to end: {_runs_shown(busy)}")
            said = True
        time.sleep(min(_RUNS_POLL_S, max(0.0, deadline - time.monotonic())))


def _registered(context: dg.OpExecutionContext, prefix: str) -> bool:
    return context.instance.has_dynamic_partition(S3_PREFIX_PARTITIONS_NAME, prefix)


def _runs_shown(busy: Mapping[str, set[str]]) -> str:
    return "; ".join(f"{prefix!r} by run {', '.join(sorted(runs))}" for prefix, runs in sorted(busy.items())[:_SHOWN])


@dg.job(
    name=REMOVE_VANISHED_JOB_NAME,
    description="Removes prefixes that no longer hold objects from every partitioned table and from the instance "
    "(requested by the discovery sensor when IMGEMB_VANISHED_PREFIXES=remove).",
)
def remove_vanished_prefixes_job() -> None:
    remove_prefixes()
