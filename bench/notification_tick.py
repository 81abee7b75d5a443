"""One discovery tick from S3 event notifications against one full listing, on a moto S3 server on 127.0.0.1.

    python -m bench.notification_tick [--objects 100000] [--new 5] [--burst 200]

A flat root of `--objects` small objects in a bucket whose object events go to an
SQS queue. The objects are real objects of the bucket, created in the moto server
process before it serves (`imgemb_support.moto_preloaded`: 100,000 PUTs over HTTP
take 8 to 15 minutes on 2 cores); the notification configuration is then set and
the queue purged, so it holds what a quiet bucket's queue holds: nothing. Then
`--new` objects are uploaded (and one removed) over HTTP, and one tick is timed:
drain the queue, map the keys to partitions (64 stable hash buckets),
acknowledge. Every AWS request the process makes is counted by service and
operation, and S3 LIST requests with events on the S3 client as well (0 expected
during the tick). For comparison: one paginated ListObjectsV2 of the root, then a
burst tick after `--burst` new objects. Ends with one JSON line.

On moto, both comparisons are slower than on AWS in ways that have nothing to
do with this code: a ListObjectsV2 page costs time in proportion to the whole
bucket (0.8 s a page at 100,000 objects), and a ReceiveMessage scans the whole
queue several times over (about 1 s a receive with 1,000 messages queued,
in-process), so a burst's drain grows with the square of its size here, where
SQS answers a receive in tens of milliseconds whatever the queue holds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import botocore.client

from bench import print_summary
from imgemb_assets.core.ingest.notifications import acknowledge, drain_queue, partitions_touched, sqs_client
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.core.storage.s3_store import S3ObjectStore
from imgemb_support.moto_preloaded import running_preloaded_moto_server
from imgemb_support.moto_server import client_environment
from imgemb_support.s3_notifications import create_event_queue, moto_sqs_client, queue_depth

BUCKET = "bench-notifications"
ROOT = "raw-images"
HASH_BUCKETS = 64
UPLOAD_THREADS = 32


def partition_of(key: str) -> str:
    """A stable hash bucket of the key (what a `hash:64` scheme does to a flat root)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % HASH_BUCKETS
    return f"part-{bucket:02d}-of-{HASH_BUCKETS}"


class RequestCounter:
    """Every botocore API call made in this process, by (service, operation), while counting."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def counting(self) -> Iterator[Counter[tuple[str, str]]]:
        self.calls = Counter()
        original = botocore.client.BaseClient._make_api_call
        counter = self

        def counted(client: Any, operation_name: str, api_params: Any) -> Any:
            with counter._lock:
                counter.calls[(client.meta.service_model.service_name, operation_name)] += 1
            return original(client, operation_name, api_params)

        botocore.client.BaseClient._make_api_call = counted  # type: ignore[method-assign]
        try:
            yield self.calls
        finally:
            botocore.client.BaseClient._make_api_call = original  # type: ignore[method-assign]

    def of(self, service: str) -> int:
        return sum(count for (name, _), count in self.calls.items() if name == service)


def put_objects(client: Any, keys: list[str]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=b"x"), keys))
    return time.perf_counter() - started


def tick(sqs: Any, queue_url: str, counter: RequestCounter) -> dict[str, Any]:
    """One tick: drain, map to partitions, acknowledge; its time, what it found and the requests it made."""
    with counter.counting():
        started = time.perf_counter()
        drained = drain_queue(sqs, queue_url, f"s3://{BUCKET}/{ROOT}")
        touched = partitions_touched(drained.changed, partition_of)
        acknowledged = acknowledge(sqs, queue_url, drained)
        seconds = time.perf_counter() - started
    return {
        "s": seconds,
        "messages": drained.messages_read,
        "created": len(drained.created),
        "removed": len(drained.removed),
        "partitions": len(touched.counts),
        "acknowledged": acknowledged.deleted,
        "s3_requests": counter.of("s3"),
        "sqs_requests": counter.of("sqs"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=5, help="objects added before the timed tick (one more is removed)")
    parser.add_argument("--burst", type=int, default=200, help="objects added before the burst tick (0: none)")
    args = parser.parse_args()
    counter = RequestCounter()
    key_format = f"{ROOT}/img_{{:07d}}.jpg"
    started = time.perf_counter()
    with running_preloaded_moto_server(BUCKET, key_format, args.objects) as endpoint:
        preload_s = time.perf_counter() - started
        os.environ.update(client_environment(endpoint))
        settings = S3Settings()
        s3 = settings.client()
        s3_lists = Counter[str]()
        for operation in ("ListObjectsV2", "ListObjects"):
            s3.meta.events.register(f"before-call.s3.{operation}", lambda model, **_: s3_lists.update([model.name]))
        queue_url = create_event_queue(s3, moto_sqs_client(settings, endpoint), BUCKET, "imgemb-events")
        sqs = sqs_client(settings, queue_url)
        queued_before_purge = queue_depth(sqs, queue_url)  # the configuration's s3:TestEvent
        sqs.purge_queue(QueueUrl=queue_url)
        assert queue_depth(sqs, queue_url) == 0

        new_upload_s = put_objects(s3, [f"{ROOT}/new_{number:03d}.jpg" for number in range(args.new)])
        s3.delete_object(Bucket=BUCKET, Key=key_format.format(0))
        lists_before = sum(s3_lists.values())
        quiet = tick(sqs, queue_url, counter)
        s3_list_requests_in_tick = sum(s3_lists.values()) - lists_before
        assert quiet["created"] == args.new and quiet["removed"] == 1, quiet

        store = S3ObjectStore(s3, BUCKET, ROOT)
        with counter.counting():
            started = time.perf_counter()
            listed = sum(1 for _ in store.list_objects(""))
            listing_s = time.perf_counter() - started
        listing_requests = counter.calls[("s3", "ListObjectsV2")]
        assert listed == args.objects + args.new - 1, listed

        burst: dict[str, Any] = {}
        if args.burst:
            burst_upload_s = put_objects(s3, [f"{ROOT}/burst_{number:06d}.jpg" for number in range(args.burst)])
            burst = tick(sqs, queue_url, counter)
            assert burst["created"] == args.burst, burst

    summary: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "objects": args.objects,
        "server_start_with_objects_s": round(preload_s, 1),
        "messages_purged": queued_before_purge,
        "new_objects_upload_s": round(new_upload_s, 2),
        "tick_s": round(quiet["s"], 3),
        "tick_messages": quiet["messages"],
        "tick_created": quiet["created"],
        "tick_removed": quiet["removed"],
        "tick_partitions_touched": quiet["partitions"],
        "tick_s3_list_requests": s3_list_requests_in_tick,
        "tick_s3_requests": quiet["s3_requests"],
        "tick_sqs_requests": quiet["sqs_requests"],
        "full_listing_s": round(listing_s, 2),
        "full_listing_objects": listed,
        "full_listing_requests": listing_requests,
        "listing_over_tick": round(listing_s / quiet["s"], 1),
    }
    if burst:
        summary |= {
            "burst_upload_s": round(burst_upload_s, 1),
            "burst_tick_s": round(burst["s"], 3),
            "burst_messages": burst["messages"],
            "burst_partitions_touched": burst["partitions"],
            "burst_s3_requests": burst["s3_requests"],
            "burst_sqs_requests": burst["sqs_requests"],
        }
    print_summary(summary)


if __name__ == "__main__":
    main()
