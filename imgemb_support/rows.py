"""The smallest valid rows of the pipeline's tables, for tests and benchmarks that write a Delta table directly."""

from __future__ import annotations

import pyarrow as pa

from imgemb_assets.core.tables import DOWNSCALED_IMAGES_SCHEMA, REJECTED_IMAGES_SCHEMA


def downscaled_rows(prefix: str, ids: list[str]) -> pa.Table:
    """`downscaled_images` rows of one prefix for `ids`, with placeholder pixels: what a join reads."""
    n = len(ids)
    return pa.table(
        {
            "image_id": ids,
            "prefix": [prefix] * n,
            "etag": ["e"] * n,
            "width": pa.array([1] * n, pa.int32()),
            "height": pa.array([1] * n, pa.int32()),
            "image_jpeg": [b"jpeg"] * n,
        },
        schema=DOWNSCALED_IMAGES_SCHEMA,
    )


def rejected_rows(prefix: str, ids: list[str]) -> pa.Table:
    """`rejected_images` rows of one prefix for `ids` (uri `<prefix>/<id>.jpg`, reason "r"): the smallest rows a Lake test writes."""
    return pa.table(
        {
            "image_id": ids,
            "prefix": [prefix] * len(ids),
            "uri": [f"{prefix}/{i}.jpg" for i in ids],
            "reason": ["r"] * len(ids),
        },
        schema=REJECTED_IMAGES_SCHEMA,
    )
