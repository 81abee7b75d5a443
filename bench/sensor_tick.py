"""Wall time of raw_prefix_sensor ticks over many prefixes on a moto S3 server on 127.0.0.1.

    python -m bench.sensor_tick [--prefixes 1000] [--objects-per-prefix 100]

Times, side by side in one run: the first tick (every prefix is new; the
sensor fingerprints up to 100 new prefixes per tick), then, after the
daemon's writes of each tick and ticks until every prefix is registered, a
quiet tick (prefix listing plus the few most recent prefixes), and a full
reconciliation plan (every prefix fingerprinted again). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from dagster import SensorResult, build_sensor_context, instance_for_test

from bench import print_summary
from bench.scale_support import sensor_origin, store_sensor_state, write_tick_as_daemon
from imgemb_assets.core.ingest.discovery import plan_discovery
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import (
    DEFAULT_RECENT_PREFIXES,
    build_raw_prefix_sensor,
    known_prefixes,
)
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME
from imgemb_support.moto_server import client_environment, running_moto_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=1000)
    parser.add_argument("--objects-per-prefix", type=int, default=100)
    args = parser.parse_args()
    with running_moto_server() as endpoint:
        os.environ.update(client_environment(endpoint))
        client = S3Settings().client()
        client.create_bucket(Bucket="bench")
        keys = [
            f"raw/2026-{p:04d}/img_{o:03d}.jpg" for p in range(args.prefixes) for o in range(args.objects_per_prefix)
        ]
        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda key: client.put_object(Bucket="bench", Key=key, Body=b"x"), keys))
        upload_s = time.perf_counter() - started
        storage = StorageResource(
            raw_images_uri="s3://bench/raw",
            sales_uri="s3://bench/sales",
            lake_uri="s3://bench/delta",
            s3=ImgembS3Resource(),
        )
        sensor = build_raw_prefix_sensor()
        timings: dict[str, float] = {}
        cursor, requested, reported, ticks = None, {}, {}, 0
        with instance_for_test() as instance:
            origin = sensor_origin("raw_prefix_sensor")
            store_sensor_state(instance, origin, "")
            # The first tick, then ticks until every prefix is registered (at most
            # max_new_prefixes each), then a tick with nothing new: the steady state.
            while True:
                with build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
                    started = time.perf_counter()
                    result = sensor(context)
                    seconds = time.perf_counter() - started
                assert isinstance(result, SensorResult)
                ticks += 1
                tick = "first_tick_s" if ticks == 1 else "quiet_tick_s"
                timings[tick], cursor = seconds, result.cursor
                requested[tick], reported[tick] = len(result.run_requests), len(result.asset_events)
                added = [key for request in result.dynamic_partitions_requests for key in request.partition_keys]
                write_tick_as_daemon(instance, origin, result.cursor, added, result.asset_events)
                if ticks > 1 and not added and not result.asset_events:
                    break
            registered = instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)
            started = time.perf_counter()
            known = known_prefixes(instance, registered)
            full = plan_discovery(storage.raw_images(), known, DEFAULT_RECENT_PREFIXES, full=True)
            timings["full_reconciliation_s"] = time.perf_counter() - started
    summary = {
        "cpu_count": os.cpu_count(),
        "prefixes": args.prefixes,
        "objects": len(keys),
        "upload_s": round(upload_s, 1),
        **{key: round(value, 2) for key, value in timings.items()},
        "first_tick_requests": requested["first_tick_s"],
        "ticks": ticks,
        "quiet_tick_requests": requested["quiet_tick_s"],
        "first_tick_reported": reported["first_tick_s"],
        "cursor_bytes": len((cursor or "").encode()),
        "full_reconciliation_changed": len(full.changed),
        "quiet_over_first": round(timings["quiet_tick_s"] / timings["first_tick_s"], 4),
    }
    print_summary(summary)


if __name__ == "__main__":
    main()
