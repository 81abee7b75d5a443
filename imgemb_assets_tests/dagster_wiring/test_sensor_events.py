"""The discovery sensor fed by the bucket's S3 event notifications (IMGEMB_S3_EVENTS_QUEUE_URL), on the moto server:
a tick lists nothing (every S3 request counted by a proxy in front of moto), registers and reports the partitions
the queued events touch, deletes the messages, and a second tick with an empty queue reports nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context, instance_for_test

from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import build_raw_prefix_sensor
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.names import S3_EVENTS_KEY, S3_PREFIX_PARTITIONS_NAME
from imgemb_support.fault_proxy import running_fault_proxy
from imgemb_support.location import store_sensor_result
from imgemb_support.s3_notifications import create_event_queue, moto_sqs_client, queue_depth


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _tick(instance: DagsterInstance, storage: StorageResource, queue_url: str) -> SensorResult:
    with build_sensor_context(instance=instance, cursor=None, resources={"storage": storage}) as context:
        result = build_raw_prefix_sensor(events_queue_url=queue_url)(context)
    assert isinstance(result, SensorResult)
    store_sensor_result(instance, result)
    return result


def test_a_tick_from_the_event_queue_lists_nothing_and_reports_the_touched_partitions(
    moto_endpoint: str, bucket: str, instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = S3Settings()
    client = settings.client()
    sqs = moto_sqs_client(settings, moto_endpoint)
    queue_url = create_event_queue(client, sqs, bucket, f"events-{bucket}", prefix="raw-images/")
    keys = ["raw-images/a.jpg", "raw-images/b.jpg", "raw-images/2026-11-01/c.jpg", "elsewhere/d.jpg"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"photo bytes")
    with running_fault_proxy(moto_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # every S3 request of the sensor goes through the proxy
        storage = StorageResource(
            raw_images_uri=f"s3://{bucket}/raw-images",
            sales_uri=f"s3://{bucket}/sales-data",
            lake_uri=str(tmp_path / "lake"),
            s3=ImgembS3Resource(),
        )
        result = _tick(instance, storage, queue_url)
        assert proxy.stats().get("gets", 0) == 0, "the tick sent S3 a listing or a read"
        scheme = PartitionScheme()
        expected = sorted({scheme.partition_of(key.removeprefix("raw-images/")) for key in keys[:3]})
        assert sorted(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)) == expected
        reported = {event.partition: event.metadata[S3_EVENTS_KEY].value for event in result.asset_events}
        assert sorted(reported) == expected and sum(reported.values()) == 3
        assert queue_depth(sqs, queue_url) == 0, "the messages acted on are deleted"

        again = _tick(instance, storage, queue_url)
        assert again.asset_events == [] and again.dynamic_partitions_requests == []
        client.delete_object(Bucket=bucket, Key="raw-images/a.jpg")
        removed = _tick(instance, storage, queue_url)
        assert [event.partition for event in removed.asset_events] == [scheme.partition_of("a.jpg")]
        assert proxy.stats().get("gets", 0) == 0

        # the same tick without the queue lists the root, and the proxy sees it: the zeros above are no blind spot
        with build_sensor_context(instance=instance, cursor=None, resources={"storage": storage}) as context:
            build_raw_prefix_sensor()(context)
        assert proxy.stats().get("gets", 0) > 0
