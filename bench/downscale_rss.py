"""Wall time and peak RSS of the `downscaled_images` step for one prefix, as the prefix grows.

    python -m bench.downscale_rss [--objects 1000 16000] [--workdir DIR]

For each size N, a local raw-images root gets one prefix folder `p` holding N small
JPEG photos (eight distinct 320x240 images, noise over gradients, copied under
distinct names img_000001.jpg ...). A fresh process then materializes
`raw_image_manifest` and `downscaled_images` (which also writes `rejected_images`)
for partition "p" through Dagster (in-process executor, test instance, local lake)
and reports its peak RSS (ru_maxrss of the child: both steps, Dagster included).
A step that streams the prefix keeps peak RSS flat as N grows; one that holds every
thumbnail grows with it. Ends with one JSON line.

The generated data lives under --workdir (one fresh folder per size, kept), or
under a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import print_summary

PREFIX = "p"
DISTINCT_IMAGES = 8

_CHILD = """
import json, resource, sys, time
from dagster import instance_for_test, materialize
from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.ingest.assets import build_ingest_assets
from imgemb_assets.dagster_wiring.location.partitions import prefix_backfill_policy
from imgemb_assets.dagster_wiring.ingest.resources import ImageLimitsResource
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
raw, sales, lake, prefix = sys.argv[1:5]
wanted = {"raw_image_manifest", "downscaled_images"}
assets = [a for a in build_ingest_assets(prefix_backfill_policy(LocationSettings())) if getattr(a, "node_def", None) is not None and a.node_def.name in wanted]
assert {a.node_def.name for a in assets} == wanted, [a.node_def.name for a in assets]
rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with instance_for_test() as instance:
    instance.add_dynamic_partitions("s3_prefix", [prefix])
    started = time.perf_counter()
    result = materialize(
        assets,
        partition_key=prefix,
        instance=instance,
        resources={
            "storage": StorageResource(raw_images_uri=raw, sales_uri=sales, lake_uri=lake, s3=ImgembS3Resource()),
            "image_limits": ImageLimitsResource(),
        },
    )
    seconds = time.perf_counter() - started
assert result.success
rows = {}
for event in result.get_asset_materialization_events():
    materialization = event.event_specific_data.materialization
    rows[materialization.asset_key.to_user_string()] = materialization.metadata["dagster/row_count"].value
checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
print(json.dumps({
    "seconds": seconds,
    "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "rss_before_kib": rss_before_kib,
    "rows": rows,
    "checks": checks,
}))
"""


def distinct_jpegs(count: int = DISTINCT_IMAGES, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    """`count` different photo-like JPEGs: smooth colour gradients under per-pixel noise, quality 85."""
    width, height = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for i in range(count):
        angle = 2 * np.pi * i / count
        ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2
        base = np.stack([ramp, 1 - ramp, (x * y) / (width * height) * (i + 1) % 1.0], axis=-1) * 200
        noisy = np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(noisy, "RGB").save(out, format="JPEG", quality=85)
        images.append(out.getvalue())
    return images


def write_raw_prefix(folder: Path, objects: int, jpegs: list[bytes]) -> int:
    """N files img_000001.jpg ... cycling through `jpegs`; returns the bytes written."""
    folder.mkdir(parents=True)
    written = 0
    for i in range(1, objects + 1):
        data = jpegs[i % len(jpegs)]
        (folder / f"img_{i:06d}.jpg").write_bytes(data)
        written += len(data)
    return written


def measure(base: Path, objects: int, jpegs: list[bytes]) -> dict[str, object]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"n{objects}-", dir=base))  # fresh: no stored thumbnails to reuse
    raw, sales, lake = run_dir / "raw", run_dir / "sales", run_dir / "lake"
    started = time.perf_counter()
    raw_bytes = write_raw_prefix(raw / PREFIX, objects, jpegs)
    generate_s = time.perf_counter() - started
    sales.mkdir()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(raw), str(sales), str(lake), PREFIX],
        capture_output=True,
        text=True,
        check=False,
    )
    child_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"child failed for {objects} objects:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "generate_s": generate_s, "child_s": child_s, "raw_mb": raw_bytes / 2**20, "dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, nargs="+", default=[1000, 16000])
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated data here (default: a temp dir)")
    args = parser.parse_args()
    jpegs = distinct_jpegs()
    print(
        f"{len(jpegs)} distinct JPEGs, {sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB each on average", flush=True
    )
    results: dict[int, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="downscale_rss-") as scratch:
        base = args.workdir or Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        for objects in args.objects:
            r = results[objects] = measure(base, objects, jpegs)
            print(
                f"{objects:>7} objects ({r['raw_mb']:7.1f} MiB raw)  {r['seconds']:7.1f} s  "
                f"peak RSS {r['peak_rss_kib']:>9} KiB ({r['peak_rss_kib'] / 1024:7.1f} MiB; "
                f"{r['rss_before_kib'] / 1024:.1f} MiB before materialize)  "
                f"rows downscaled {r['rows'].get('downscaled_images')} rejected {r['rows'].get('rejected_images')}  "
                f"checks {r['checks']}",
                flush=True,
            )
    smallest, largest = min(results), max(results)
    summary: dict[str, object] = {"cpu_count": os.cpu_count()}
    for objects, r in results.items():
        summary[f"seconds_{objects}"] = round(r["seconds"], 1)
        summary[f"peak_rss_kib_{objects}"] = r["peak_rss_kib"]
        summary[f"peak_rss_mb_{objects}"] = round(r["peak_rss_kib"] / 1024, 1)
        summary[f"rss_before_mb_{objects}"] = round(r["rss_before_kib"] / 1024, 1)
        summary[f"rows_{objects}"] = r["rows"].get("downscaled_images")
        summary[f"rejected_{objects}"] = r["rows"].get("rejected_images")
    summary["rss_ratio"] = round(results[largest]["peak_rss_kib"] / results[smallest]["peak_rss_kib"], 3)
    print_summary(summary)


if __name__ == "__main__":
    main()
