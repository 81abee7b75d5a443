"""Objects listed per second and images downscaled per second against a moto S3 server on 127.0.0.1,
with the same downscaling from a local folder measured side by side.

    python -m bench.s3_throughput [--objects 10000] [--images 600]   (from the repository root)

Prints a table and ends with one JSON line. Needs the dev extra (moto[server]).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import print_summary
from imgemb_assets.core.ingest.manifest import build_manifest
from imgemb_assets.core.ingest.thumbnails import downscale_partition
from imgemb_assets.core.sample.dataset import generate_sample_dataset
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.moto_server import client_environment, running_moto_server


def _timed(action):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000, help="objects in the listed prefix")
    parser.add_argument("--images", type=int, default=600, help="images in the downscaled prefix")
    args = parser.parse_args()
    with running_moto_server() as endpoint, tempfile.TemporaryDirectory() as scratch:
        os.environ.update(client_environment(endpoint))
        client = S3Settings().client()
        client.create_bucket(Bucket="bench")
        with ThreadPoolExecutor(32) as pool:
            list(
                pool.map(
                    lambda n: client.put_object(Bucket="bench", Key=f"raw/many/o_{n:06d}.jpg", Body=b"x"),
                    range(args.objects),
                )
            )
        store = open_object_store("s3://bench/raw")
        listed, list_s = _timed(lambda: list(store.list_objects("many")))
        assert len(listed) == args.objects

        dataset = generate_sample_dataset(Path(scratch), images_per_prefix=args.images, prefixes=("p",))
        local_store = open_object_store(dataset.raw_images_uri)
        for path in sorted((Path(dataset.raw_images_uri) / "p").iterdir()):
            client.upload_file(str(path), "bench", f"raw/p/{path.name}")
        results = {}
        for name, source in (("local", local_store), ("s3", store)):
            manifest = build_manifest(list(source.list_objects("p")), "p")
            out, seconds = _timed(lambda: downscale_partition(source, manifest))
            results[name] = (out.images.num_rows + out.rejected.num_rows) / seconds
    summary = {
        "cpu_count": os.cpu_count(),
        "objects_listed": args.objects,
        "list_objects_per_s": round(args.objects / list_s, 1),
        "images": args.images,
        "downscale_local_img_s": round(results["local"], 1),
        "downscale_s3_img_s": round(results["s3"], 1),
        "s3_over_local": round(results["s3"] / results["local"], 3),
    }
    print_summary(summary)


if __name__ == "__main__":
    main()
