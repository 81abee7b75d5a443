"""The one partitioning scheme: a partition is a first-level prefix under the raw-images root."""

from collections.abc import Sequence

from dagster import DagsterInstance, DynamicPartitionsDefinition

from imgemb_assets.core.lake.commits import Precondition
from imgemb_assets.core.lake.errors import PartitionRemovedError

S3_PREFIX_PARTITIONS_NAME = "s3_prefix"

s3_prefix_partitions = DynamicPartitionsDefinition(name=S3_PREFIX_PARTITIONS_NAME)


def register_prefixes(instance: DagsterInstance, prefixes: Sequence[str], register: bool = True) -> list[str]:
    """The prefixes not yet registered as partitions, registered (unless `register` is false: a dry run)."""
    known = set(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    added = [prefix for prefix in dict.fromkeys(prefixes) if prefix not in known]
    if added and register:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, added)
    return added


def still_registered(instance: DagsterInstance, prefix: str) -> Precondition:
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
