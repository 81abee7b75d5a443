"""Re-materializing an unchanged partition, as a fraction of its first materialization.

    python -m bench.rematerialize [--images 1000]

Runs the embed_prefix job twice for one generated partition (in-process
executor, local lake, random-initialised ResNet50 on this machine's device) and
reports both wall times, their ratio and the forward passes of each run. Ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dagster import AssetKey, instance_for_test

from bench import print_summary
from imgemb_assets.core.lake import tables
from imgemb_assets.core.sample.dataset import generate_sample_dataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, S3_PREFIX_PARTITIONS_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions

defs = build_definitions(LocationSettings())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, instance_for_test() as instance:
        dataset = generate_sample_dataset(Path(scratch) / "data", images_per_prefix=args.images, prefixes=("p",))
        os.environ.update(
            IMGEMB_RAW_IMAGES_URI=dataset.raw_images_uri, IMGEMB_SALES_URI=dataset.sales_uri,
            IMGEMB_LAKE_URI=str(Path(scratch) / "lake"), IMGEMB_MODEL_WEIGHTS="random",
        )  # fmt: skip
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, ["p"])
        defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance)
        job = defs.resolve_job_def(PREFIX_JOB_NAME)
        runs = []
        for _ in range(2):
            started = time.perf_counter()
            job.execute_in_process(instance=instance, partition_key="p")
            seconds = time.perf_counter() - started
            metadata = instance.get_latest_materialization_event(
                AssetKey(tables.IMAGE_EMBEDDINGS)
            ).asset_materialization.metadata
            runs.append((seconds, metadata["images_embedded"].value, metadata["images_reused"].value))
    (first_s, first_embedded, _), (second_s, second_embedded, second_reused) = runs
    summary = {
        "cpu_count": os.cpu_count(),
        "images": args.images,
        "first_s": round(first_s, 2),
        "first_images_embedded": first_embedded,
        "second_s": round(second_s, 2),
        "second_images_embedded": second_embedded,
        "second_images_reused": second_reused,
        "second_over_first": round(second_s / first_s, 4),
    }
    print_summary(summary)


if __name__ == "__main__":
    main()
