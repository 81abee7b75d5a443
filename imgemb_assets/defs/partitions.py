"""The one partitioning scheme: a partition is a first-level prefix under the raw-images root."""

from dagster import DynamicPartitionsDefinition

S3_PREFIX_PARTITIONS_NAME = "s3_prefix"

s3_prefix_partitions = DynamicPartitionsDefinition(name=S3_PREFIX_PARTITIONS_NAME)
