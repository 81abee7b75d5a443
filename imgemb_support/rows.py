"""The smallest valid rows of the pipeline's tables, for tests and benchmarks that write a Delta table directly."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from imgemb_assets.core.imaging.images import downscale
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.tables import DOWNSCALED_IMAGES_SCHEMA, REJECTED_IMAGES_SCHEMA

# The joined and embedding tables of a sales export holding only the required columns.
SALES_SCHEMA = pa.schema(tables.SALES_REQUIRED_FIELDS)
JOINED_SCHEMA = tables.images_with_sales_schema(SALES_SCHEMA)
EMBEDDINGS_SCHEMA = tables.image_embeddings_schema(SALES_SCHEMA)


def random_thumbnails(count: int, seed: int, size: tuple[int, int] = (90, 120)) -> list[bytes]:
    """`count` thumbnails of random pixels (photos of `size` rows x columns), made as the pipeline stores them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(downscale(buffer.getvalue()).jpeg)
    return out


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
            "decoded_with": pa.array([None] * n, pa.string()),  # never reused by a rewrite
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
            "etag": pa.array([None] * len(ids), pa.string()),
            "decoded_with": pa.array([None] * len(ids), pa.string()),
        },
        schema=REJECTED_IMAGES_SCHEMA,
    )
