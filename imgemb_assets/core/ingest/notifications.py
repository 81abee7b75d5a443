"""Changed objects read from S3 event notifications in an SQS queue, so a discovery tick lists nothing.

A bucket can send an event for every object created or removed to an SQS queue
(directly, through an SNS topic, or through EventBridge). `drain_queue` reads up
to a bound of those messages and returns the keys they name, relative to the
raw-images root, split into created and removed; `acknowledge` deletes the
messages once the caller has acted on them (registered or reported the
partitions), so a tick that fails before then reads them again: delivery is at
least once, end to end. `partitions_touched` maps the keys to partitions through
whatever scheme the caller has (a plain `partition_of(key)` callable).

Notifications are not a complete record: S3 delivers "typically in seconds,
occasionally a minute or longer", at least once, unordered, and a message
deleted by mistake, expired in the queue or sent while the notification was
misconfigured is gone. The periodic reconciliation (a full listing) remains the
source of truth; this module only makes the frequent tick cheap.

Message shapes read (the body of each SQS message, JSON):
- S3's own event message: `{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket":
  {"name": ...}, "object": {"key": <URL-encoded key>, "sequencer": ...}}}]}`. Keys are
  form-URL-encoded ('+' for a space, %XX for the rest; AWS leaves '/' as is, moto
  encodes it as %2F): decoded with `unquote_plus`.
- The test event S3 sends when the configuration is set: `{"Event": "s3:TestEvent", ...}`.
- An SNS notification whose `Message` string holds one of the above (a topic
  subscribed by the queue without raw message delivery).
- An EventBridge event (`"source": "aws.s3"`, `"detail-type": "Object Created"` or
  `"Object Deleted"`), its key decoded the same way.
Anything else is counted as malformed and acknowledged: it would never parse, and
a message left in the queue would be read again by every tick.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote_plus, urlsplit

from imgemb_assets.core.storage.s3 import DEFAULT_REGION, S3ConfigError, S3Settings, split_s3_uri

# SQS hands out at most 10 messages per ReceiveMessage and deletes at most 10 per DeleteMessageBatch.
SQS_BATCH: Final = 10

# https://sqs.<region>.amazonaws.com/<account>/<name>, and the legacy https://<region>.queue.amazonaws.com/...
_AWS_QUEUE_HOST: Final = re.compile(
    r"^(?:sqs\.(?P<region>[a-z0-9-]+)|(?P<legacy>[a-z0-9-]+)\.queue|queue)\.amazonaws\.com(?:\.cn)?$"
)
_CREATED_EVENTS: Final = ("ObjectCreated:",)
_REMOVED_EVENTS: Final = ("ObjectRemoved:", "LifecycleExpiration:")
_EVENTBRIDGE_KINDS: Final = {"Object Created": "created", "Object Deleted": "removed"}


class EventQueueConfigError(S3ConfigError):
    """The events queue setting is unusable; the message says why (never a credential)."""


# --- the SQS client ----------------------------------------------------------


def queue_region_and_endpoint(queue_url: str) -> tuple[str | None, str | None]:
    """The region an AWS queue URL names (None elsewhere), and the endpoint to send its requests to.

    An AWS queue is reached through boto3's own endpoint for its region (None); any
    other host (moto, LocalStack, ElasticMQ) is its own endpoint: a queue URL says
    where its queue is, and an S3-compatible store's endpoint need not serve SQS.
    """
    parts = urlsplit(queue_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/").count("/") != 1:
        raise EventQueueConfigError(f"{queue_url!r} is not an SQS queue URL (http(s)://host/<account>/<queue name>)")
    match = _AWS_QUEUE_HOST.match(parts.hostname or "")
    if match is None:
        return None, f"{parts.scheme}://{parts.netloc}"
    return match.group("region") or match.group("legacy") or DEFAULT_REGION, None


def sqs_client(settings: S3Settings, queue_url: str) -> Any:
    """A boto3 SQS client for `queue_url` with `settings`' credentials, retries and timeouts.

    The region is the queue URL's on AWS, else the settings' (or AWS_REGION, else
    us-east-1). `AWS_ENDPOINT_URL_SQS` overrides the endpoint (a VPC endpoint, say);
    `AWS_ENDPOINT_URL`, which may name an S3-compatible store, is not used for an
    AWS queue.
    """
    region, endpoint = queue_region_and_endpoint(queue_url)
    session = settings.session()
    override = os.environ.get("AWS_ENDPOINT_URL_SQS") or None
    return session.client(
        "sqs",
        endpoint_url=override or endpoint,
        region_name=region or session.region_name or os.environ.get("AWS_REGION") or DEFAULT_REGION,
        # An AWS queue with AWS_ENDPOINT_URL pointing at MinIO: SQS must still go to AWS.
        config=settings.botocore_config(ignore_configured_endpoint_urls=endpoint is None and override is None),
    )


# --- reading messages --------------------------------------------------------


@dataclass(frozen=True)
class ObjectEvent:
    """One object event read from a message: the key as in the bucket (decoded), created or removed."""

    bucket: str
    key: str
    kind: str  # "created" | "removed"
    sequencer: str | None = None  # S3's per-key order (hex); None from moto and EventBridge without one
    event_time: str = ""


@dataclass(frozen=True)
class ParsedMessage:
    """What one message body holds: object events, or a test event, or nothing readable (malformed)."""

    events: tuple[ObjectEvent, ...] = ()
    test_event: bool = False
    malformed: bool = False
    other_records: int = 0  # records of events that change no object's content (tagging, ACL, restore, ...)


def parse_message(body: str) -> ParsedMessage:
    """The object events in one SQS message body (S3, SNS-wrapped S3, EventBridge, test event), never raising."""
    try:
        return _parse_document(json.loads(body), sns_unwrapped=False)
    except (ValueError, TypeError, AttributeError, KeyError, UnicodeError):
        return ParsedMessage(malformed=True)


def _parse_document(doc: Any, sns_unwrapped: bool) -> ParsedMessage:
    if not isinstance(doc, dict):
        return ParsedMessage(malformed=True)
    if doc.get("Event") == "s3:TestEvent":
        return ParsedMessage(test_event=True)
    if not sns_unwrapped and doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        return _parse_document(json.loads(doc["Message"]), sns_unwrapped=True)
    if isinstance(doc.get("Records"), list):
        return _parse_records(doc["Records"])
    if doc.get("source") == "aws.s3" and isinstance(doc.get("detail"), dict):
        return _parse_eventbridge(doc)
    return ParsedMessage(malformed=True)


def _parse_records(records: list[Any]) -> ParsedMessage:
    events: list[ObjectEvent] = []
    other = 0
    malformed = not records
    for record in records:
        try:
            name = str(record["eventName"]).removeprefix("s3:")
            kind = _kind_of(name)
            if kind is None:
                other += 1
                continue
            s3 = record["s3"]
            obj = s3["object"]
            key = _decoded_key(obj["key"])
            sequencer = obj.get("sequencer")
            events.append(
                ObjectEvent(
                    bucket=str(s3["bucket"]["name"]),
                    key=key,
                    kind=kind,
                    sequencer=str(sequencer) if sequencer else None,
                    event_time=str(record.get("eventTime", "")),
                )
            )
        except (KeyError, TypeError, ValueError, UnicodeError):
            malformed = True  # this record; the message's readable records still count
    return ParsedMessage(events=tuple(events), malformed=malformed, other_records=other)


def _parse_eventbridge(doc: dict[str, Any]) -> ParsedMessage:
    kind = _EVENTBRIDGE_KINDS.get(str(doc.get("detail-type")))
    if kind is None:
        return ParsedMessage(other_records=1)
    detail = doc["detail"]
    obj = detail["object"]
    sequencer = obj.get("sequencer")
    event = ObjectEvent(
        bucket=str(detail["bucket"]["name"]),
        key=_decoded_key(obj["key"]),
        kind=kind,
        sequencer=str(sequencer) if sequencer else None,
        event_time=str(doc.get("time", "")),
    )
    return ParsedMessage(events=(event,))


def _kind_of(event_name: str) -> str | None:
    if event_name.startswith(_CREATED_EVENTS):
        return "created"
    if event_name.startswith(_REMOVED_EVENTS):
        return "removed"
    return None


def _decoded_key(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError("no object key")
    return unquote_plus(raw, encoding="utf-8", errors="strict")


# --- draining a queue --------------------------------------------------------

DEFAULT_MAX_MESSAGES: Final = 10_000
# Received messages stay hidden from other readers this long: enough for a tick to
# read, act and acknowledge. A tick that dies first leaves them to reappear after it.
DEFAULT_VISIBILITY_TIMEOUT_S: Final = 300
# Receives in flight at once: each is a round trip (tens of ms on AWS), 1,000 of them for 10,000 messages.
DEFAULT_RECEIVE_THREADS: Final = 4


@dataclass(frozen=True)
class QueueDrain:
    """The objects changed under a root according to the messages read, and the messages to acknowledge.

    A key is in `created` when its latest event (by S3's sequencer, else event time,
    else arrival) created it, in `removed` when the latest removed it: never in both.
    """

    created: frozenset[str]  # keys relative to the root
    removed: frozenset[str]
    messages_read: int  # distinct messages received
    records: int = 0  # object events read (any bucket, any key)
    ignored_records: int = 0  # other buckets, keys outside the root, folder markers, events changing no content
    test_events: int = 0
    malformed: int = 0  # messages with an unreadable body or record (acknowledged all the same)
    # True when `max_messages` was reached: more may be waiting, for the next tick.
    more_waiting: bool = False
    # The latest receipt handle of each message read; `acknowledge` deletes them.
    receipt_handles: tuple[str, ...] = field(default=(), repr=False)

    @property
    def changed(self) -> frozenset[str]:
        return self.created | self.removed


def drain_queue(
    client: Any,
    queue_url: str,
    root_uri: str,
    *,
    max_messages: int = DEFAULT_MAX_MESSAGES,
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S,
    receive_threads: int = DEFAULT_RECEIVE_THREADS,
) -> QueueDrain:
    """Read up to `max_messages` messages (10 per receive, no long polling) and the keys they change under `root_uri`.

    Stops at the bound or when a receive returns nothing (SQS short polling may
    answer empty while messages remain: they are read next tick). Deletes nothing:
    call `acknowledge` once the result has been acted on.
    """
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, got {max_messages}")
    bucket, root_key = split_s3_uri(root_uri)
    received = _receive(client, queue_url, max_messages, visibility_timeout_s, max(1, receive_threads))
    handles: dict[str, str] = {}  # message id -> latest receipt handle
    bodies: dict[str, str] = {}
    for message in received:
        message_id = message.get("MessageId") or message["ReceiptHandle"]
        handles[message_id] = message["ReceiptHandle"]
        bodies.setdefault(message_id, message.get("Body") or "")
    latest: dict[str, tuple[tuple[int, str, int], str]] = {}  # key -> (order, kind)
    records = ignored = test_events = malformed = 0
    for arrival, body in enumerate(bodies.values()):
        parsed = parse_message(body)
        test_events += parsed.test_event
        malformed += parsed.malformed
        records += len(parsed.events) + parsed.other_records
        ignored += parsed.other_records
        for event in parsed.events:
            relative = _relative_key(event, bucket, root_key)
            if relative is None:
                ignored += 1
                continue
            order = (_sequence_number(event.sequencer), event.event_time, arrival)
            if relative not in latest or latest[relative][0] <= order:
                latest[relative] = (order, event.kind)
    return QueueDrain(
        created=frozenset(key for key, (_, kind) in latest.items() if kind == "created"),
        removed=frozenset(key for key, (_, kind) in latest.items() if kind == "removed"),
        messages_read=len(bodies),
        records=records,
        ignored_records=ignored,
        test_events=test_events,
        malformed=malformed,
        more_waiting=len(received) >= max_messages,
        receipt_handles=tuple(handles.values()),
    )


def _receive(client: Any, queue_url: str, max_messages: int, visibility_timeout_s: int, threads: int) -> list[dict]:
    """Receive calls of up to 10 from `threads` workers until `max_messages` in all, or until a receive is empty."""
    lock = threading.Lock()
    received: list[dict] = []
    reserved = 0

    def worker() -> None:
        nonlocal reserved
        while True:
            with lock:
                want = min(SQS_BATCH, max_messages - reserved)
                if want <= 0:
                    return
                reserved += want
            messages = client.receive_message(
                QueueUrl=queue_url,
                MaxNumberOfMessages=want,
                WaitTimeSeconds=0,
                VisibilityTimeout=visibility_timeout_s,
            ).get("Messages", [])
            with lock:
                reserved -= want - len(messages)
                received.extend(messages)
            if not messages:
                return

    if threads == 1:
        worker()
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sqs-receive") as pool:
            for future in [pool.submit(worker) for _ in range(threads)]:
                future.result()  # a client error fails the drain; nothing was deleted
    return received


def _relative_key(event: ObjectEvent, bucket: str, root_key: str) -> str | None:
    """The key relative to the root; None for another bucket, a key outside the root, or a folder marker."""
    if event.bucket != bucket:
        return None
    prefix = f"{root_key}/" if root_key else ""
    if not event.key.startswith(prefix):
        return None
    relative = event.key[len(prefix) :]
    if not relative or relative.endswith("/"):
        return None  # a "folder" marker made by consoles, not an object with content
    return relative


def _sequence_number(sequencer: str | None) -> int:
    # S3: "compare the sequencer strings as hexadecimal values" for events of one key.
    if not sequencer:
        return -1
    try:
        return int(sequencer, 16)
    except ValueError:
        return -1


# --- acknowledging -----------------------------------------------------------


# Delete requests in flight at once, when a drain holds more than one batch of 10.
ACKNOWLEDGE_THREADS: Final = 4


@dataclass(frozen=True)
class Acknowledged:
    deleted: int
    # Messages SQS did not delete (a receipt handle expired past the visibility
    # timeout, say): they are read again by a later tick, which is harmless.
    failed: int


def acknowledge(client: Any, queue_url: str, drained: QueueDrain | Iterable[str]) -> Acknowledged:
    """Delete the messages of a drain (or these receipt handles) from the queue, 10 per request."""
    handles = list(drained.receipt_handles if isinstance(drained, QueueDrain) else drained)
    batches = [handles[start : start + SQS_BATCH] for start in range(0, len(handles), SQS_BATCH)]

    def delete(batch: list[str]) -> tuple[int, int]:
        entries = [{"Id": str(number), "ReceiptHandle": handle} for number, handle in enumerate(batch)]
        answer = client.delete_message_batch(QueueUrl=queue_url, Entries=entries)
        return len(answer.get("Successful", [])), len(answer.get("Failed", []))

    if len(batches) <= 1:
        results = [delete(batch) for batch in batches]
    else:
        with ThreadPoolExecutor(max_workers=ACKNOWLEDGE_THREADS, thread_name_prefix="sqs-delete") as pool:
            results = list(pool.map(delete, batches))
    deleted = failed = 0
    for ok, bad in results:
        deleted, failed = deleted + ok, failed + bad
    return Acknowledged(deleted=deleted, failed=failed)


# --- keys to partitions ------------------------------------------------------

# Keys in no partition named in a tick's log: enough to recognise the kind of stray object.
UNCOVERED_SAMPLE: Final = 10


@dataclass(frozen=True)
class TouchedPartitions:
    """How many changed keys fall in each partition, and how many in none (loose objects no partition covers)."""

    counts: dict[str, int]
    uncovered: int = 0
    uncovered_sample: tuple[str, ...] = ()  # the first few such keys, sorted, for a tick's log


def partitions_touched(
    keys: Iterable[str], partition_of: Callable[[str], str | None], sample: int = UNCOVERED_SAMPLE
) -> TouchedPartitions:
    """{partition key: changed keys in it} through the scheme's `partition_of(key)` (None: in no partition)."""
    counts: dict[str, int] = {}
    uncovered: list[str] = []
    for key in keys:
        partition = partition_of(key)
        if partition is None:
            uncovered.append(key)
        else:
            counts[partition] = counts.get(partition, 0) + 1
    shown = tuple(sorted(uncovered)[:sample])
    return TouchedPartitions(counts=dict(sorted(counts.items())), uncovered=len(uncovered), uncovered_sample=shown)
