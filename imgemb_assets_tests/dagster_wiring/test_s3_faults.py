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
from dagster import ExecuteInProcessResult

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.bad_inputs import CORPUS_PREFIX, TEST_MAX_IMAGE_BYTES, write_corpus_dataset
from imgemb_support.fault_proxy import running_fault_proxy
from imgemb_support.location import dataset_on_s3
from imgemb_support.s3_graph import comparable_rows, run_partition_through, step_retries

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

# A stalled request is dropped after this long and retried by the client.
READ_TIMEOUT_S = 1.0


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
    assert all(result.success for result in faulty), [step_retries(result) for result in faulty]
    # (few of the GETs come from boto3, so a cut-short body may not be drawn: see test_s3_storage)
    assert all(stats[kind] > 0 for kind in ("slowdown", "reset", "stall")), stats

    options = S3Settings(endpoint_url=moto_endpoint).delta_storage_options()
    clean_lake, faulty_lake = Lake(f"s3://{bucket}/clean", options), Lake(f"s3://{bucket}/faulty", options)
    for name in tables.ALL_TABLES:
        assert comparable_rows(faulty_lake, name) == comparable_rows(clean_lake, name), name
    assert faulty_lake.read(tables.IMAGE_EMBEDDINGS).num_rows == len(corpus_on_s3.image_ids[CORPUS_PREFIX])


def test_an_outage_past_the_client_retries_is_retried_by_the_step(
    corpus_on_s3: SampleDataset, bucket: str, moto_endpoint: str
) -> None:
    # The first five GETs (all of botocore's attempts at the sales listing) get 503 SlowDown.
    with running_fault_proxy(moto_endpoint, outage_requests=S3Settings().max_attempts) as proxy:
        sales, prefix = _run(corpus_on_s3, f"s3://{bucket}/outage", proxy.url)
        stats = proxy.stats()
    assert sales.success and prefix.success
    assert step_retries(sales) == ["sales"]
    assert step_retries(prefix) == []
    assert stats["slowdown"] == S3Settings().max_attempts
    assert Lake(f"s3://{bucket}/outage", S3Settings(endpoint_url=moto_endpoint).delta_storage_options()).read(
        tables.SALES
    ).num_rows == len(corpus_on_s3.sales_image_ids)


def _run(dataset: SampleDataset, lake_uri: str, endpoint: str) -> tuple[ExecuteInProcessResult, ExecuteInProcessResult]:
    return run_partition_through(dataset, CORPUS_PREFIX, lake_uri, endpoint, READ_TIMEOUT_S, TEST_MAX_IMAGE_BYTES)
