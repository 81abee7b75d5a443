"""The one partitioning scheme: a partition is a first-level prefix under the raw-images root."""

from collections.abc import Sequence

from dagster import DagsterInstance, DynamicPartitionsDefinition

S3_PREFIX_PARTITIONS_NAME = "s3_prefix"

s3_prefix_partitions = DynamicPartitionsDefinition(name=S3_PREFIX_PARTITIONS_NAME)


def register_prefixes(instance: DagsterInstance, prefixes: Sequence[str], register: bool = True) -> list[str]:
    """The prefixes not yet registered as partitions, registered (unless `register` is false: a dry run)."""
    known = set(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    added = [prefix for prefix in dict.fromkeys(prefixes) if prefix not in known]
    if added and register:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, added)
    return added
