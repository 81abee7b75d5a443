"""What the embedding_drift check costs: reading the previous partition's vectors back for their moments,
next to writing that partition, on a local lake.

    python -m bench.drift_check [--vectors 20000] [--width 2048]   (from the repository root)

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa

from bench import print_summary
from imgemb_assets.core.embedding.drift import MOMENTS_BATCH_ROWS, moments_of_batches
from imgemb_assets.core.lake.embedding_column import embedding_array
from imgemb_assets.core.lake.lake import Lake

_BATCH = 4096


def _batches(vectors: int, width: int) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(0)
    out = []
    for start in range(0, vectors, _BATCH):
        rows = min(_BATCH, vectors - start)
        out.append(
            pa.record_batch(
                {
                    "prefix": ["previous"] * rows,
                    "model_id": ["m"] * rows,
                    "embedding": embedding_array(np.abs(rng.normal(1, 0.3, (rows, width))).astype(np.float32)),
                }
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        lake = Lake(scratch)
        batches = _batches(args.vectors, args.width)
        started = time.perf_counter()
        lake.write_partition_stream("vectors", iter(batches), batches[0].schema, "previous")
        write_s = time.perf_counter() - started
        del batches
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        moments = moments_of_batches(
            lake.read_batches("vectors", "previous", columns=["model_id", "embedding"], batch_rows=MOMENTS_BATCH_ROWS),
            "m",
        )
        read_s = time.perf_counter() - started
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print_summary(
        {
            "vectors": moments.count,
            "width": args.width,
            "write_partition_s": round(write_s, 2),
            "drift_moments_s": round(read_s, 2),
            "moments_over_write": round(read_s / write_s, 2),
            "peak_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
        }
    )


if __name__ == "__main__":
    main()
