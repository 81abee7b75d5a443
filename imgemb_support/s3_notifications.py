"""An SQS queue receiving a bucket's S3 event notifications, on the moto server (tests and the notification benchmark).

moto's server delivers a bucket's notifications to its own SQS queues, as AWS does:
`put_bucket_notification_configuration` with a `QueueConfigurations` entry, then
every object created or removed sends one message (moto 5.2.5: one record per
message, the key `quote_plus`-encoded with '/' as %2F, no `sequencer`), and the
configuration itself sends an `s3:TestEvent` message.
"""

from __future__ import annotations

from typing import Any

OBJECT_EVENTS = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]


def moto_sqs_client(settings: Any, endpoint: str, region: str = "us-east-1") -> Any:
    """A plain SQS client on the moto server at `endpoint` (for creating queues; the code under test builds its own)."""
    return settings.session().client("sqs", endpoint_url=endpoint, region_name=region)


def create_event_queue(s3_client: Any, sqs: Any, bucket: str, queue_name: str, prefix: str | None = None) -> str:
    """A new queue receiving `bucket`'s object-created and object-removed events (under `prefix` if given): its URL.

    The queue then holds the configuration's `s3:TestEvent` message, as on AWS.
    """
    queue_url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    configuration: dict[str, Any] = {"QueueArn": queue_arn, "Events": OBJECT_EVENTS}
    if prefix:
        configuration["Filter"] = {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}
    s3_client.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [configuration]}
    )
    return queue_url


def queue_depth(sqs: Any, queue_url: str) -> int:
    """Messages in the queue, visible or in flight (SQS's approximate counts; exact on moto)."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])
