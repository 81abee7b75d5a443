"""Changed objects read from S3 event notifications on a real SQS queue (the moto server delivers a bucket's
notifications to its own queues), acknowledged only when asked; and the pure parts: message shapes, the
queue URL's region and endpoint, and the keys' partitions."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from imgemb_assets.core.ingest.notifications import (
    EventQueueConfigError,
    QueueDrain,
    acknowledge,
    drain_queue,
    parse_message,
    partitions_touched,
    queue_region_and_endpoint,
    sqs_client,
)
from imgemb_assets.core.storage.names import partition_key_of
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.s3_notifications import create_event_queue, moto_sqs_client, queue_depth

ROOT = "raw-images"


@pytest.fixture
def event_queue(bucket: str, moto_endpoint: str) -> str:
    """The URL of a new queue receiving `bucket`'s object events; the configuration's test event is in it."""
    settings = S3Settings()
    sqs = moto_sqs_client(settings, moto_endpoint)
    return create_event_queue(settings.client(), sqs, bucket, f"q-{uuid.uuid4().hex[:12]}")


def _sqs(queue_url: str) -> object:
    return sqs_client(S3Settings(), queue_url)


def _s3_record(bucket: str, encoded_key: str, event: str = "ObjectCreated:Put", sequencer: str | None = None) -> dict:
    obj: dict = {"key": encoded_key, "size": 1, "eTag": "0" * 32}
    if sequencer:
        obj["sequencer"] = sequencer
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": "2026-12-07T05:00:56.494Z",
        "eventName": event,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
    }


def test_object_events_under_the_root_are_read_then_acknowledged(bucket: str, event_queue: str) -> None:
    s3 = S3Settings().client()
    for key in [
        f"{ROOT}/2026-11-01/a.jpg",
        f"{ROOT}/summer sale/red+flower é 50%.jpg",  # '+', space, non-ASCII and '%' in one key
        f"{ROOT}/stray.jpg",  # directly under the root: a key like any other here
        f"{ROOT}/2026-11-02/b.jpg",
        f"{ROOT}/2026-11-03/",  # a console's folder marker
        "elsewhere/2026-11-01/c.jpg",
        f"{ROOT}-other/d.jpg",
    ]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else b"x")
    copy_source = {"Bucket": bucket, "Key": f"{ROOT}/stray.jpg"}
    s3.copy_object(Bucket=bucket, Key=f"{ROOT}/2026-11-04/copy.jpg", CopySource=copy_source)
    s3.delete_object(Bucket=bucket, Key=f"{ROOT}/2026-11-02/b.jpg")
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"{ROOT}/stray.jpg"}]})
    sqs = _sqs(event_queue)

    drained = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}")

    assert drained.created == {"2026-11-01/a.jpg", "summer sale/red+flower é 50%.jpg", "2026-11-04/copy.jpg"}
    assert drained.removed == {"2026-11-02/b.jpg", "stray.jpg"}  # created, then removed: its latest event wins
    # the test event, 7 puts, 1 copy, 2 deletes
    assert (drained.messages_read, drained.test_events, drained.records, drained.malformed) == (11, 1, 10, 0)
    assert drained.ignored_records == 3  # the folder marker and the two keys outside the root
    assert not drained.more_waiting
    assert queue_depth(sqs, event_queue) == 11  # nothing deleted before the caller acknowledges

    assert acknowledge(sqs, event_queue, drained).deleted == 11
    assert queue_depth(sqs, event_queue) == 0
    again = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}")
    assert (again.messages_read, again.changed) == (0, frozenset())


def test_the_whole_bucket_as_root(bucket: str, event_queue: str) -> None:
    s3 = S3Settings().client()
    s3.put_object(Bucket=bucket, Key="top.jpg", Body=b"x")
    s3.put_object(Bucket=bucket, Key="p/q/deep.jpg", Body=b"x")
    drained = drain_queue(_sqs(event_queue), event_queue, f"s3://{bucket}")
    assert drained.created == {"top.jpg", "p/q/deep.jpg"}


def test_malformed_messages_are_counted_and_removed(bucket: str, event_queue: str) -> None:
    sqs = _sqs(event_queue)
    good = _s3_record(bucket, f"{ROOT}/summer+sale/red+flower.jpg")  # AWS's encoding: '/' left as is
    bodies = [
        "not json",
        "[]",
        json.dumps({"foo": 1}),
        json.dumps({"Records": []}),
        json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}),  # no s3 part
        json.dumps({"Type": "Notification", "Message": "{cut short"}),
        json.dumps({"Records": [_s3_record(bucket, f"{ROOT}/p/%FF.jpg")]}),  # not UTF-8 once decoded
        json.dumps({"Records": [good, {"eventName": "ObjectRemoved:Delete", "s3": {}}]}),  # one good record, one not
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=event_queue, MessageBody=body)

    drained = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}")

    assert drained.malformed == len(bodies)
    assert drained.test_events == 1
    assert drained.created == {"summer sale/red flower.jpg"}
    assert acknowledge(sqs, event_queue, drained).deleted == len(bodies) + 1
    assert queue_depth(sqs, event_queue) == 0


def test_sns_wrapped_and_eventbridge_messages(bucket: str, event_queue: str) -> None:
    sqs = _sqs(event_queue)
    s3_event = {"Records": [_s3_record(bucket, f"{ROOT}/p1/from+sns.jpg", "ObjectRemoved:DeleteMarkerCreated")]}
    sns = {"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": json.dumps(s3_event)}
    sns_test = {"Type": "Notification", "Message": json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})}
    eventbridge = {
        "version": "0",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "detail": {"bucket": {"name": bucket}, "object": {"key": f"{ROOT}/p2/from%20eventbridge.jpg", "size": 1}},
    }
    tagging = {**eventbridge, "detail-type": "Object Tags Added"}  # changes no content
    for body in (sns, sns_test, eventbridge, tagging):
        sqs.send_message(QueueUrl=event_queue, MessageBody=json.dumps(body))

    drained = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}")

    assert drained.removed == {"p1/from sns.jpg"}
    assert drained.created == {"p2/from eventbridge.jpg"}
    assert (drained.test_events, drained.malformed, drained.ignored_records) == (2, 0, 1)


def test_the_latest_event_of_a_key_wins_by_sequencer_then_arrival(bucket: str, event_queue: str) -> None:
    sqs = _sqs(event_queue)
    # S3's order: removed (sequencer 0A) before created (sequencer 0B), delivered the other way round
    for record in (
        _s3_record(bucket, f"{ROOT}/p/back.jpg", "ObjectCreated:Put", "0000B"),
        _s3_record(bucket, f"{ROOT}/p/back.jpg", "ObjectRemoved:Delete", "0A"),
    ):
        sqs.send_message(QueueUrl=event_queue, MessageBody=json.dumps({"Records": [record]}))
    s3 = S3Settings().client()
    s3.put_object(Bucket=bucket, Key=f"{ROOT}/p/gone.jpg", Body=b"x")  # moto: no sequencer, arrival order
    s3.delete_object(Bucket=bucket, Key=f"{ROOT}/p/gone.jpg")

    drained = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}", receive_threads=1)

    assert (drained.created, drained.removed) == ({"p/back.jpg"}, {"p/gone.jpg"})


def test_a_drain_stops_at_its_bound_and_the_rest_waits(bucket: str, event_queue: str) -> None:
    s3 = S3Settings().client()
    for number in range(24):
        s3.put_object(Bucket=bucket, Key=f"{ROOT}/p/{number:02d}.jpg", Body=b"x")
    sqs = _sqs(event_queue)
    seen: set[str] = set()
    reads = []
    for _ in range(4):
        drained = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}", max_messages=12)
        reads.append((drained.messages_read, drained.more_waiting))
        seen |= drained.created
        acknowledge(sqs, event_queue, drained)
    # 25 messages (the test event and 24 puts), at most 12 a drain. moto may hand one message to two of a
    # drain's receive threads at once (its visibility timeout is not atomic): counted once, so a drain that
    # reached its bound may report 11 distinct messages.
    assert reads[0] == (12, True) and all(read <= 12 for read, _ in reads)
    assert sum(read for read, _ in reads) == 25 and reads[-1] == (0, False)
    assert len(seen) == 24


def test_messages_not_acknowledged_are_read_again(bucket: str, event_queue: str) -> None:
    S3Settings().client().put_object(Bucket=bucket, Key=f"{ROOT}/p/a.jpg", Body=b"x")
    sqs = _sqs(event_queue)
    first = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}", visibility_timeout_s=1)
    assert first.created == {"p/a.jpg"}
    assert drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}").messages_read == 0  # hidden while in flight
    time.sleep(1.5)  # the tick died without acknowledging: the messages come back
    again = drain_queue(sqs, event_queue, f"s3://{bucket}/{ROOT}")
    assert (again.created, again.messages_read) == ({"p/a.jpg"}, 2)
    assert acknowledge(sqs, event_queue, again).deleted == 2


def test_a_message_received_twice_in_one_drain_counts_once_and_is_deleted(bucket: str, event_queue: str) -> None:
    S3Settings().client().put_object(Bucket=bucket, Key=f"{ROOT}/p/a.jpg", Body=b"x")
    sqs = _sqs(event_queue)
    # visible again at once: every receive returns the same two messages, up to the bound
    drained = drain_queue(
        sqs, event_queue, f"s3://{bucket}/{ROOT}", visibility_timeout_s=0, max_messages=30, receive_threads=1
    )
    assert (drained.messages_read, len(drained.receipt_handles), drained.created) == (2, 2, {"p/a.jpg"})
    assert acknowledge(sqs, event_queue, drained).deleted == 2
    assert queue_depth(sqs, event_queue) == 0


def test_parse_message_never_raises() -> None:
    empty_key = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": ""}}}
    for body in [
        "",
        "null",
        "1",
        '"x"',
        '{"Records": null}',
        '{"Records": [null]}',
        '{"Type": "Notification", "Message": 5}',
        '{"source": "aws.s3", "detail-type": "Object Created", "detail": {}}',
        json.dumps({"Records": [empty_key]}),
    ]:
        assert parse_message(body).malformed, body
    assert parse_message('{"Event": "s3:TestEvent"}').test_event


def test_partitions_touched_counts_keys_per_partition_and_the_uncovered() -> None:
    keys = ["2026-11-01/a.jpg", "2026-11-01/b.jpg", "2026-11-02/deep/c.jpg", "stray.jpg", "other.jpg"]
    touched = partitions_touched(keys, partition_key_of)
    assert touched.counts == {"2026-11-01": 2, "2026-11-02": 1}
    assert (touched.uncovered, touched.uncovered_sample) == (2, ("other.jpg", "stray.jpg"))
    assert partitions_touched(QueueDrain(frozenset(), frozenset(), 0).changed, partition_key_of).counts == {}


def test_queue_url_region_and_endpoint() -> None:
    assert queue_region_and_endpoint("https://sqs.eu-west-1.amazonaws.com/123456789012/events") == ("eu-west-1", None)
    assert queue_region_and_endpoint("https://us-west-2.queue.amazonaws.com/123456789012/q") == ("us-west-2", None)
    assert queue_region_and_endpoint("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q") == ("cn-north-1", None)
    assert queue_region_and_endpoint("http://127.0.0.1:5000/123456789012/q") == (None, "http://127.0.0.1:5000")
    for bad in ["", "sqs://x/1/q", "https://sqs.eu-west-1.amazonaws.com/q", "arn:aws:sqs:eu-west-1:1:q"]:
        with pytest.raises(EventQueueConfigError):
            queue_region_and_endpoint(bad)


def test_an_aws_queue_is_reached_on_aws_whatever_the_s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_SQS", raising=False)
    settings = S3Settings(aws_access_key_id="k", aws_secret_access_key="s")
    client = sqs_client(settings, "https://sqs.eu-west-1.amazonaws.com/1/q")
    assert (client.meta.region_name, client.meta.endpoint_url) == ("eu-west-1", "https://sqs.eu-west-1.amazonaws.com")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com")
    client = sqs_client(settings, "https://sqs.eu-west-1.amazonaws.com/1/q")
    assert client.meta.endpoint_url == "https://vpce-1.sqs.eu-west-1.vpce.amazonaws.com"
