"""Reading and validating the sales export, and joining it onto images."""

from __future__ import annotations

import io

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from imgemb_assets.core.quality import duplicate_image_ids
from imgemb_assets.core.storage import ObjectInfo, ObjectStore
from imgemb_assets.core.tables import RESERVED_SALES_COLUMNS, SALES_REQUIRED_FIELDS


class SalesError(ValueError):
    """The sales export cannot be used; the message names the file and the problem."""


def list_sales_files(store: ObjectStore) -> list[ObjectInfo]:
    return [obj for obj in store.list_objects("") if obj.key.lower().endswith(".parquet")]


def read_sales(store: ObjectStore) -> pa.Table:
    """Every parquet file under the sales root, validated and concatenated."""
    files = list_sales_files(store)
    if not files:
        raise SalesError(f"no .parquet files under the sales root {store.root_uri}")
    tables = [validate_sales(_read_parquet(store, obj), source=obj.uri) for obj in files]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise SalesError(f"sales files under {store.root_uri} have incompatible columns: {exc}") from exc


def validate_sales(table: pa.Table, source: str) -> pa.Table:
    """Require a string `image_id` and a numeric `sales` column; keep the others.

    `sales` is normalised to float64 so exports that alternate between integer
    and decimal figures keep one Delta schema.
    """
    names = set(table.column_names)
    for field in SALES_REQUIRED_FIELDS:
        if field.name not in names:
            raise SalesError(f"{source}: required column {field.name!r} is missing (columns: {sorted(names)})")
    reserved = sorted(names & RESERVED_SALES_COLUMNS)
    if reserved:
        raise SalesError(f"{source}: columns {reserved} clash with image columns; rename them in the export")
    image_id_type = table.schema.field("image_id").type
    if not (pa.types.is_string(image_id_type) or pa.types.is_large_string(image_id_type)):
        raise SalesError(f"{source}: column 'image_id' must be a string, found {image_id_type}")
    sales_type = table.schema.field("sales").type
    if not (pa.types.is_integer(sales_type) or pa.types.is_floating(sales_type) or pa.types.is_decimal(sales_type)):
        raise SalesError(f"{source}: column 'sales' must be numeric, found {sales_type}")
    if table.column("image_id").null_count:
        raise SalesError(f"{source}: {table.column('image_id').null_count} rows have no image_id")
    for field in SALES_REQUIRED_FIELDS:
        index = table.schema.get_field_index(field.name)
        table = table.set_column(index, field, table.column(index).cast(field.type))
    return table.select(["image_id", *[name for name in table.column_names if name != "image_id"]])


def join_with_sales(images: pa.Table, sales: pa.Table, schema: pa.Schema) -> pa.Table:
    """Inner join on image_id, as the article does, in image_id order.

    Refused when sales repeats an image_id: each repeat would silently add a
    copy of the image (and later of its embedding) to the partition.
    """
    unique_ids = duplicate_image_ids(sales)
    if not unique_ids.passed:
        raise SalesError(f"the sales table cannot be joined: {unique_ids.description}; fix the export")
    joined = pl.from_arrow(images).join(pl.from_arrow(sales), on="image_id", how="inner").sort("image_id")
    return joined.to_arrow().select(schema.names).cast(schema)


def _read_parquet(store: ObjectStore, obj: ObjectInfo) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(store.read_bytes(obj.uri)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise SalesError(f"{obj.uri}: not a readable parquet file: {exc}") from exc
