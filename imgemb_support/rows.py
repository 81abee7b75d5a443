"""The smallest valid rows of the pipeline's tables, for tests and benchmarks that write a Delta table directly."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from imgemb_assets.core.imaging.images import downscale
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.embedding_column import embedding_array
from imgemb_assets.core.lake.lake import Lake
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


# A sales export with a category and a price beside the required columns: what `--where` filters on.
CATALOGUE_SALES_SCHEMA = pa.schema(
    [*tables.SALES_REQUIRED_FIELDS, pa.field("category", pa.string()), pa.field("price", pa.float64())]
)


def write_catalogue(
    lake: Lake, prefix: str, rows: Sequence[tuple[str, str | None, float | None]], vectors: np.ndarray, model_id: str
) -> None:
    """One prefix of a catalogue as the pipeline leaves it: `sales` (merged with what is there), `images_with_sales`
    and `image_embeddings`. `rows` are (image_id, category, price); image i has sales 10 * i and vector `vectors[i]`.
    """
    ids = [image_id for image_id, _, _ in rows]
    sales = pa.table(
        {
            "image_id": ids,
            "sales": [10.0 * i for i in range(len(rows))],
            "category": [category for _, category, _ in rows],
            "price": [price for _, _, price in rows],
        },
        schema=CATALOGUE_SALES_SCHEMA,
    )
    images = downscaled_rows(prefix, ids).drop_columns(["decoded_with"])
    joined = pa.Table.from_arrays(
        [*images.columns, *sales.drop_columns(["image_id"]).columns],
        schema=tables.images_with_sales_schema(CATALOGUE_SALES_SCHEMA),
    )
    lake.write_partition(tables.IMAGES_WITH_SALES, joined, prefix)
    embedded = joined.drop_columns(["width", "height", "image_jpeg"])
    embedded = embedded.append_column("embedding", embedding_array(vectors)).append_column(
        "model_id", pa.array([model_id] * len(ids), pa.string())
    )
    lake.write_partition(
        tables.IMAGE_EMBEDDINGS, embedded.cast(tables.image_embeddings_schema(CATALOGUE_SALES_SCHEMA)), prefix
    )
    if lake.exists(tables.SALES):
        known = lake.read(tables.SALES)
        sales = pa.concat_tables([known.filter(pc.invert(pc.is_in(known.column("image_id"), pa.array(ids)))), sales])
    lake.overwrite(tables.SALES, sales)


def write_fan_catalogue(lake: Lake, model_id: str, width: int = 16) -> dict[str, np.ndarray]:
    """A catalogue whose nearest neighbours are known, indexed for `model_id`; image_id -> vector.

    Image `img_j` (j = 1..20) lies at angle 0.05 j from the query image `q` in one plane:
    its similarity to `q` is cos(0.05 j), so the nearest are the lowest j. `q` and the
    eight nearest are hats, the rest shoes; `img_j` costs 5 j (`img_12` has no price,
    `q` costs 1). Odd j are in prefix p1 with `q`, even j in p2; sales are 10 x the
    image's row in its prefix (`write_catalogue`).
    """
    from imgemb_assets.core.search.refresh import refresh_search_indexes

    plane = np.zeros((2, width), np.float32)
    plane[0, 0] = plane[1, 1] = 1.0
    vectors: dict[str, np.ndarray] = {"q": plane[0]}
    rows: dict[str, list[tuple[str, str | None, float | None]]] = {"p1": [("q", "hats", 1.0)], "p2": []}
    for j in range(1, 21):
        image_id = f"img_{j:02d}"
        vectors[image_id] = np.cos(0.05 * j) * plane[0] + np.sin(0.05 * j) * plane[1]
        rows["p1" if j % 2 else "p2"].append((image_id, "hats" if j <= 8 else "shoes", None if j == 12 else 5.0 * j))
    for prefix, prefix_rows in rows.items():
        write_catalogue(lake, prefix, prefix_rows, np.stack([vectors[i] for i, _, _ in prefix_rows]), model_id)
    refresh_search_indexes(lake)
    return vectors
