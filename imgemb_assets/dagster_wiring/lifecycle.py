"""Prefixes that vanish from the root: reported, and by a setting removed from every table and the instance.

A prefix exists while it holds objects. The discovery sensor compares the
prefixes it lists with the registered partitions on every tick; a registered
prefix that is no longer listed has vanished. With IMGEMB_VANISHED_PREFIXES=keep
(the default) the sensor reports it (once per change of the vanished set) and it
stays registered; the rolling reconciliation then sees its empty listing and
automation empties its partitions, so the tables follow the bucket. With
`remove`, the sensor requests a run of `remove_vanished_prefixes`, which checks
again that each prefix holds no object, deletes the partition from the
instance (no new run can be requested for it) and deletes its rows from every
partitioned table (one Delta commit per table): Dagster's data-retention
pattern. The UI's partition status counts registered partitions only, so its
counts stay true; the event log keeps the removed prefix's history (Dagster's
open-source storages cannot wipe single partitions), and readers of earlier
table versions keep theirs until a vacuum past the retention.

A listing that suddenly misses most prefixes is more likely a wrong root, an
expired credential or an unmounted disk than a mass deletion: the sensor then
refuses to request any removal and says why.
"""

import hashlib
from collections.abc import Sequence
from typing import Final

from dagster import Config, MetadataValue, OpExecutionContext, Output, RunRequest, job, op

from imgemb_assets.core import tables
from imgemb_assets.dagster_wiring.partitions import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.dagster_wiring.resources import StorageResource

REMOVE_VANISHED_JOB_NAME: Final = "remove_vanished_prefixes"
# More than this share of the registered prefixes vanishing in one listing is refused.
MAX_VANISHED_SHARE: Final = 0.5
_SHOWN: Final = 10

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


def removal_request(vanished: Sequence[str]) -> RunRequest:
    """A run of remove_vanished_prefixes for these prefixes; the same set is requested once."""
    digest = hashlib.sha256("\0".join(sorted(vanished)).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return RunRequest(
        run_key=f"{REMOVE_VANISHED_JOB_NAME}:{digest}",
        job_name=REMOVE_VANISHED_JOB_NAME,
        run_config={"ops": {"remove_prefixes": {"config": {"prefixes": sorted(vanished)}}}},
    )


class RemovePrefixesConfig(Config):
    prefixes: list[str]


@op(name="remove_prefixes")
def remove_prefixes(context: OpExecutionContext, config: RemovePrefixesConfig, storage: StorageResource) -> Output[None]:
    lake = storage.lake()
    still_there = set(storage.partitioned_root().current_partitions())
    registered = set(context.instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    removable = sorted(p for p in set(config.prefixes) if p not in still_there and p in registered)
    kept = sorted(set(config.prefixes) - set(removable))
    if kept:
        context.log.warning(f"left as they are (objects back under the root, or not registered): {shown(kept)}")
    rows_removed: dict[str, int] = {name: 0 for name in PARTITIONED_TABLES}
    for prefix in removable:
        # The partition leaves the instance first, so nothing requests it while its rows go.
        context.instance.delete_dynamic_partition(S3_PREFIX_PARTITIONS_NAME, prefix)
        for name in PARTITIONED_TABLES:
            rows_removed[name] += lake.delete_partition(name, prefix)
    # A pair is two images: one whose other side left goes too, from whichever partition holds it.
    pairs_removed = lake.delete_rows_where_in(tables.NEAR_DUPLICATES, "other_prefix", removable)
    if removable:
        context.log.info(f"removed {len(removable)} vanished prefixes: {shown(removable)}")
    return Output(
        None,
        metadata={
            "prefixes_removed": MetadataValue.json(removable),
            "prefixes_left": MetadataValue.json(kept),
            **{f"rows_removed/{name}": rows for name, rows in rows_removed.items()},
            "near_duplicates_removed_with_their_other_side": pairs_removed,
        },
    )


@job(
    name=REMOVE_VANISHED_JOB_NAME,
    description="Removes prefixes that no longer hold objects from every partitioned table and from the instance "
    "(requested by the discovery sensor when IMGEMB_VANISHED_PREFIXES=remove).",
)
def remove_vanished_prefixes_job() -> None:
    remove_prefixes()
