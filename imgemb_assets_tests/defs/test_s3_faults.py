"""Transient S3 faults (503 SlowDown, connection resets, stalls, bodies cut short) between the pipeline and the moto server.

The fault-injecting proxy subprocess sits in front of moto; boto3 and delta-rs
both go through it. With a share of LIST/GET requests failing, the run
completes and writes the same tables as a clean run; an outage longer than the
clients' own retries fails the step, and Dagster's retry policy re-runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterEventType, ExecuteInProcessResult, instance_for_test

from imgemb_assets.core import tables
from imgemb_assets.core.lake import Lake
from imgemb_assets.core.s3 import S3Settings
from imgemb_assets.core.sample_data import SampleDataset
from imgemb_assets.definitions import build_definitions, default_resources
from imgemb_assets.defs.jobs import PREFIX_JOB_NAME, SALES_JOB_NAME
from imgemb_assets.defs.partitions import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.defs.resources import (
    EmbeddingModelResource,
    ImageLimitsResource,
    ImgembS3Resource,
    StorageResource,
)
from imgemb_assets.defs.settings import LocationSettings
from imgemb_assets_tests.bad_inputs import CORPUS_PREFIX, TEST_MAX_IMAGE_BYTES, write_corpus_dataset
from imgemb_assets_tests.conftest import dataset_on_s3
from imgemb_assets_tests.fault_proxy import running_fault_proxy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

# A stalled request is dropped after this long and retried by the client.
READ_TIMEOUT_S = 1.0


def _run(dataset: SampleDataset, lake_uri: str, endpoint: str) -> tuple[ExecuteInProcessResult, ExecuteInProcessResult]:
    """The sales job, then the corpus partition's job, with every S3 request sent to `endpoint`."""
    resources = default_resources() | {
        "storage": StorageResource(
            raw_images_uri=dataset.raw_images_uri,
            sales_uri=dataset.sales_uri,
            lake_uri=lake_uri,
            s3=ImgembS3Resource(endpoint_url=endpoint, read_timeout_s=READ_TIMEOUT_S),
        ),
        "embedding_model": EmbeddingModelResource(model="resnet18", weights="random"),
        "image_limits": ImageLimitsResource(max_image_bytes=TEST_MAX_IMAGE_BYTES),
    }
    defs = build_definitions(LocationSettings(), resources)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [CORPUS_PREFIX])
        sales = defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance, raise_on_error=False)
        prefix = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
            instance=instance, partition_key=CORPUS_PREFIX, raise_on_error=False
        )
        return sales, prefix


def _rows(lake: Lake, name: str) -> list[dict]:
    table = lake.read(name)
    keep = [column for column in table.column_names if column != "uri"]  # the lake differs, the source does not
    return sorted(table.select(keep).to_pylist(), key=lambda row: (str(row.get("image_id")), str(row.get("reason"))))


def _retries(result: ExecuteInProcessResult) -> list[str]:
    return [e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]


@pytest.fixture
def corpus_on_s3(tmp_path: Path, bucket: str) -> Iterator[SampleDataset]:
    yield dataset_on_s3(write_corpus_dataset(tmp_path / "corpus"), bucket)


def test_tables_equal_a_clean_run_with_faults_on_a_share_of_requests(
    corpus_on_s3: SampleDataset, bucket: str, moto_endpoint: str
) -> None:
    clean = _run(corpus_on_s3, f"s3://{bucket}/clean", moto_endpoint)
    assert all(result.success for result in clean)
    # Bodies are cut short only for boto3 (object reads, listings): delta-rs retries
    # requests but not a body interrupted after its headers (object_store's limit).
    with running_fault_proxy(
        moto_endpoint, share=0.2, seed=11, stall_s=READ_TIMEOUT_S + 1, truncate_for="Boto3"
    ) as proxy:
        faulty = _run(corpus_on_s3, f"s3://{bucket}/faulty", proxy.url)
        stats = proxy.stats()
    assert all(result.success for result in faulty), [_retries(result) for result in faulty]
    # (few of the GETs come from boto3, so a cut-short body may not be drawn: see test_s3_storage)
    assert all(stats[kind] > 0 for kind in ("slowdown", "reset", "stall")), stats

    options = S3Settings(endpoint_url=moto_endpoint).delta_storage_options()
    clean_lake, faulty_lake = Lake(f"s3://{bucket}/clean", options), Lake(f"s3://{bucket}/faulty", options)
    for name in tables.ALL_TABLES:
        assert _rows(faulty_lake, name) == _rows(clean_lake, name), name
    assert faulty_lake.read(tables.IMAGE_EMBEDDINGS).num_rows == len(corpus_on_s3.image_ids[CORPUS_PREFIX])


def test_an_outage_past_the_client_retries_is_retried_by_the_step(
    corpus_on_s3: SampleDataset, bucket: str, moto_endpoint: str
) -> None:
    # The first five GETs (all of botocore's attempts at the sales listing) get 503 SlowDown.
    with running_fault_proxy(moto_endpoint, outage_requests=S3Settings().max_attempts) as proxy:
        sales, prefix = _run(corpus_on_s3, f"s3://{bucket}/outage", proxy.url)
        stats = proxy.stats()
    assert sales.success and prefix.success
    assert _retries(sales) == ["sales"]
    assert _retries(prefix) == []
    assert stats["slowdown"] == S3Settings().max_attempts
    assert Lake(f"s3://{bucket}/outage", S3Settings(endpoint_url=moto_endpoint).delta_storage_options()).read(
        tables.SALES
    ).num_rows == len(corpus_on_s3.sales_image_ids)
