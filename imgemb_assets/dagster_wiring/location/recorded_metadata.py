"""What the instance recorded on an asset's latest materializations: the fingerprints the sensors compare with."""

from collections.abc import Sequence

import dagster as dg


def recorded_fingerprint(
    instance: dg.DagsterInstance, asset: str, key: str, partition: str | None = None
) -> str | None:
    """The fingerprint metadata `key` of the asset's (partition's) latest materialization, if any."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=None if partition is None else [partition]
        ),
        limit=1,
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(key)
    return None if value is None else str(value.value)


def recorded_fingerprints(
    instance: dg.DagsterInstance, asset: str, key: str, partitions: Sequence[str]
) -> dict[str, str]:
    """`recorded_fingerprint` of many partitions in two queries (not one per partition); partitions without one are left out."""
    if not partitions:
        return {}  # no partition filter would mean every partition
    latest = instance.get_latest_storage_id_by_partition(
        dg.AssetKey(asset), dg.DagsterEventType.ASSET_MATERIALIZATION, partitions=set(partitions)
    )
    if not latest:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), storage_ids=list(latest.values())), limit=len(latest)
    ).records
    found: dict[str, str] = {}
    for record in records:
        value = None if record.asset_materialization is None else record.asset_materialization.metadata.get(key)
        if value is not None and record.partition_key is not None:
            found[record.partition_key] = str(value.value)
    return found
