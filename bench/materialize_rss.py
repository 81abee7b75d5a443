"""Wall time and peak RSS of a full Dagster materialization of `image_embeddings` for one partition.

    python -m bench.materialize_rss [--images 2000 20000] [--model resnet18]

For each size, a partition of `images_with_sales` with that many rows is written
(synthetic thumbnails, repeated, with distinct ids), then a fresh process
materializes `image_embeddings` for it through Dagster (in-process executor, real
instance, local lake) and reports its peak RSS. The embedding step streams the
partition, so peak RSS should not grow with it. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from imgemb_assets.core.embedding_bench import generated_thumbnails
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake

_CHILD = """
import json, resource, sys, time
from dagster import instance_for_test, materialize
from imgemb_assets.dagster_wiring.embedding.assets import build_embedding_asset
from imgemb_assets.dagster_wiring.location.partitions import prefix_backfill_policy
from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
lake, model = sys.argv[1], sys.argv[2]
with instance_for_test() as instance:
    instance.add_dynamic_partitions("s3_prefix", ["p"])
    started = time.perf_counter()
    result = materialize(
        [build_embedding_asset(prefix_backfill_policy(LocationSettings()), {}, "bench")],
        partition_key="p",
        instance=instance,
        resources={
            "storage": StorageResource(raw_images_uri=lake, sales_uri=lake, lake_uri=lake, s3=ImgembS3Resource()),
            "embedding_model": EmbeddingModelResource(weights="random", model=model),
        },
    )
    seconds = time.perf_counter() - started
assert result.success
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_joined_partition(lake: Lake, rows: int) -> None:
    thumbnails = generated_thumbnails(min(rows, 200))
    sales_schema = pa.schema([pa.field("image_id", pa.string(), nullable=False), pa.field("sales", pa.float64())])
    schema = tables.images_with_sales_schema(sales_schema)
    for start in range(0, rows, 2000):
        ids = range(start, min(rows, start + 2000))
        chunk = pa.table(
            {
                "image_id": [f"img_{i:06d}" for i in ids],
                "prefix": ["p"] * len(ids),
                "etag": [f"etag{i}" for i in ids],
                "width": pa.array([640] * len(ids), pa.int32()),
                "height": pa.array([480] * len(ids), pa.int32()),
                "image_jpeg": [thumbnails[i % len(thumbnails)] for i in ids],
                "sales": [float(i) for i in ids],
            },
            schema=schema,
        )
        if start == 0:
            lake.write_partition(tables.IMAGES_WITH_SALES, chunk, "p")
        else:  # appending chunks keeps this script's own memory small
            from deltalake import write_deltalake

            write_deltalake(lake.table_uri(tables.IMAGES_WITH_SALES), chunk, mode="append", partition_by=["prefix"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    results = {}
    for rows in args.images:
        with tempfile.TemporaryDirectory() as scratch:
            lake = Lake(str(Path(scratch) / "lake"))
            write_joined_partition(lake, rows)
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, lake.root_uri, args.model], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            results[rows] = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{rows:>7} images  {results[rows]['seconds']:8.1f} s  peak RSS {results[rows]['peak_rss_mb']:8.1f} MB",
                flush=True,
            )
    smallest, largest = min(results), max(results)
    summary = {
        "model": args.model,
        "cpu_count": os.cpu_count(),
        **{f"peak_rss_mb_{rows}": round(r["peak_rss_mb"], 1) for rows, r in results.items()},
        **{f"seconds_{rows}": round(r["seconds"], 1) for rows, r in results.items()},
        "rss_ratio": round(results[largest]["peak_rss_mb"] / results[smallest]["peak_rss_mb"], 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
