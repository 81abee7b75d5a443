"""Run the sales job and one partition's job against S3 through a given endpoint (moto, or the fault proxy).

Shared by the S3 fault tests and `bench.s3_faults`.
"""

from __future__ import annotations

from dagster import DagsterEventType, ExecuteInProcessResult, instance_for_test

from imgemb_assets.core.imaging.images import DEFAULT_MAX_IMAGE_BYTES
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
from imgemb_assets.dagster_wiring.ingest.resources import ImageLimitsResource
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, S3_PREFIX_PARTITIONS_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions, default_resources


def run_partition_through(
    dataset: SampleDataset,
    prefix: str,
    lake_uri: str,
    endpoint: str,
    read_timeout_s: float = 60.0,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> tuple[ExecuteInProcessResult, ExecuteInProcessResult]:
    """The sales job, then `prefix`'s job (resnet18, random weights), every S3 request sent to `endpoint`."""
    resources = default_resources() | {
        "storage": StorageResource(
            raw_images_uri=dataset.raw_images_uri,
            sales_uri=dataset.sales_uri,
            lake_uri=lake_uri,
            s3=ImgembS3Resource(endpoint_url=endpoint, read_timeout_s=read_timeout_s),
        ),
        "embedding_model": EmbeddingModelResource(model="resnet18", weights="random"),
        "image_limits": ImageLimitsResource(max_image_bytes=max_image_bytes),
    }
    defs = build_definitions(LocationSettings(), resources)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [prefix])
        sales = defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance, raise_on_error=False)
        partition = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
            instance=instance, partition_key=prefix, raise_on_error=False
        )
        return sales, partition


def step_retries(result: ExecuteInProcessResult) -> list[str]:
    """The steps Dagster's retry policy re-ran, once per retry."""
    return [e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]


def comparable_rows(lake: Lake, name: str) -> list[dict]:
    """A table's rows without `uri` (which names the lake), in a stable order."""
    table = lake.read(name)
    keep = [column for column in table.column_names if column != "uri"]
    return sorted(table.select(keep).to_pylist(), key=lambda row: (str(row.get("image_id")), str(row.get("reason"))))
