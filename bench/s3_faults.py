"""The cost of transient S3 faults: one partition's whole graph against the moto S3 server, clean and
through the fault-injecting proxy, side by side, and whether the tables came out the same.

    python -m bench.s3_faults [--images 200] [--share 0.2] [--rounds 2]   (from the repository root)

Each round runs clean then faulty (alternating which goes first). Prints a table and ends with one
JSON line. Needs the dev extra (moto[server]).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench import print_summary
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import generate_sample_dataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.fault_proxy import running_fault_proxy
from imgemb_support.location import dataset_on_s3
from imgemb_support.moto_server import client_environment, running_moto_server
from imgemb_support.s3_graph import comparable_rows, run_partition_through, step_retries

READ_TIMEOUT_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images in the partition")
    parser.add_argument("--share", type=float, default=0.2, help="share of GETs given a fault")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with running_moto_server() as endpoint, tempfile.TemporaryDirectory() as scratch:
        os.environ.update(client_environment(endpoint))
        S3Settings().client().create_bucket(Bucket="bench-faults")
        local = generate_sample_dataset(Path(scratch), images_per_prefix=args.images, prefixes=("p",), seed=5)
        dataset = dataset_on_s3(local, "bench-faults")
        seconds: dict[str, list[float]] = {"clean": [], "faulty": []}
        faults: dict[str, int] = {}
        retries: list[str] = []
        for round_ in range(args.rounds):
            order = ["clean", "faulty"] if round_ % 2 == 0 else ["faulty", "clean"]
            for kind in order:
                lake_uri = f"s3://bench-faults/{kind}-{round_}"
                with running_fault_proxy(
                    endpoint, share=args.share if kind == "faulty" else 0.0, seed=round_,
                    stall_s=READ_TIMEOUT_S + 1, truncate_for="Boto3",
                ) as proxy:  # fmt: skip
                    started = time.perf_counter()
                    results = run_partition_through(dataset, "p", lake_uri, proxy.url, READ_TIMEOUT_S)
                    seconds[kind].append(time.perf_counter() - started)
                    if kind == "faulty":
                        for key, count in proxy.stats().items():
                            faults[key] = faults.get(key, 0) + count
                assert all(result.success for result in results), kind
                retries += [step for result in results for step in step_retries(result)]
        lakes = {
            kind: Lake(f"s3://bench-faults/{kind}-0", S3Settings().delta_storage_options())
            for kind in ("clean", "faulty")
        }
        same = all(comparable_rows(lakes["clean"], n) == comparable_rows(lakes["faulty"], n) for n in tables.ALL_TABLES)
    clean, faulty = min(seconds["clean"]), min(seconds["faulty"])
    print_summary(
        {
            "images": args.images,
            "fault_share": args.share,
            "clean_s": [round(s, 1) for s in seconds["clean"]],
            "faulty_s": [round(s, 1) for s in seconds["faulty"]],
            "faulty_over_clean_best": round(faulty / clean, 2),
            "faults_injected": faults,
            "step_retries": retries,
            "tables_equal": same,
        }
    )


if __name__ == "__main__":
    main()
