"""Which partitions are stale: written before one of their upstream tables (or their source) last changed.

It is the rule automation follows (`automation.py`), computed from the
instance's event log so a person can see it: `imgemb status` prints it, and
`imgemb backfill-missing` runs stale partitions as well as missing ones. Every
event has a storage id that grows with time, so "written before" compares the
id of a partition's latest materialization with the ids of its upstream ones
(the same prefix of a partitioned upstream; the latest of an unpartitioned
one such as `sales`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import dagster as dg


@dataclass(frozen=True)
class PartitionStatus:
    """One partitioned asset's partitions that are not current, and why."""

    asset: str
    missing: list[str]
    stale: dict[str, list[str]]  # prefix -> the upstream assets that changed after it was written

    @property
    def not_current(self) -> list[str]:
        return sorted({*self.missing, *self.stale})


def latest_update_ids(instance: dg.DagsterInstance, asset: str) -> Mapping[str, int]:
    """Prefix -> storage id of the asset's latest materialization of it (reported ones included)."""
    return instance.event_log_storage.get_latest_storage_id_by_partition(
        dg.AssetKey(asset), dg.DagsterEventType.ASSET_MATERIALIZATION
    )


def latest_unpartitioned_id(instance: dg.DagsterInstance, asset: str) -> int | None:
    """Storage id of an unpartitioned asset's latest materialization (reported ones included), or None."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
    return records[0].storage_id if records else None


def partition_status(
    instance: dg.DagsterInstance,
    asset: str,
    partitioned_upstream: Iterable[str],
    unpartitioned_upstream: Iterable[str],
    prefixes: Iterable[str],
) -> PartitionStatus:
    """The `prefixes` of `asset` that are missing, or stale against one of its upstream assets."""
    own = latest_update_ids(instance, asset)
    upstream_ids: dict[str, Mapping[str, int]] = {
        name: latest_update_ids(instance, name) for name in partitioned_upstream
    }
    whole_ids = {name: latest_unpartitioned_id(instance, name) for name in unpartitioned_upstream}
    missing: list[str] = []
    stale: dict[str, list[str]] = {}
    for prefix in prefixes:
        written = own.get(prefix)
        if written is None:
            missing.append(prefix)
            continue
        newer = [name for name, ids in upstream_ids.items() if ids.get(prefix, -1) > written]
        newer += [name for name, latest in whole_ids.items() if latest is not None and latest > written]
        if newer:
            stale[prefix] = sorted(newer)
    return PartitionStatus(asset=asset, missing=missing, stale=stale)


def status_in_graph(
    instance: dg.DagsterInstance, defs: dg.Definitions, asset: str, prefixes: Iterable[str]
) -> PartitionStatus:
    """`partition_status` with the asset's upstream assets taken from the location's asset graph."""
    graph = defs.resolve_asset_graph()
    parents = [graph.get(key) for key in graph.get(dg.AssetKey(asset)).parent_keys]
    return partition_status(
        instance,
        asset,
        partitioned_upstream=[node.key.to_user_string() for node in parents if node.is_partitioned],
        unpartitioned_upstream=[node.key.to_user_string() for node in parents if not node.is_partitioned],
        prefixes=prefixes,
    )
