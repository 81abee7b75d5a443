"""The Arrow schema of every Delta table the pipeline writes, in one place.

Tables whose columns depend on the sales export (`images_with_sales`,
`image_embeddings`) are built from a fixed part defined here plus the validated
sales schema, so the fixed part still has exactly one definition.
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

from imgemb_assets.core.lake.embedding_column import EMBEDDING_TYPE

# Every partitioned table carries the partition key (the prefix) in this column;
# tables created before PARTITION_STORAGE_COLUMN are also physically partitioned by it.
PARTITION_COLUMN: Final = "prefix"
# New tables are physically partitioned by this column: a short value derived from
# the prefix, which Lake adds on write and drops on read (a long non-ASCII prefix,
# percent-encoded by delta-rs, is no valid folder name).
PARTITION_STORAGE_COLUMN: Final = "prefix_partition"

RAW_IMAGE_MANIFEST: Final = "raw_image_manifest"
DOWNSCALED_IMAGES: Final = "downscaled_images"
REJECTED_IMAGES: Final = "rejected_images"
SALES: Final = "sales"
IMAGES_WITH_SALES: Final = "images_with_sales"
IMAGE_EMBEDDINGS: Final = "image_embeddings"

ALL_TABLES: Final = (
    RAW_IMAGE_MANIFEST,
    DOWNSCALED_IMAGES,
    REJECTED_IMAGES,
    SALES,
    IMAGES_WITH_SALES,
    IMAGE_EMBEDDINGS,
)

RAW_IMAGE_MANIFEST_SCHEMA: Final = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=True),  # null when the name has no extension
        pa.field(PARTITION_COLUMN, pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("etag", pa.string(), nullable=False),
        pa.field("last_modified", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

# Columns of a downscaled image that travel on to the joined and embedding tables.
_IMAGE_KEY_FIELDS: Final = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field(PARTITION_COLUMN, pa.string(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
]
_IMAGE_PIXEL_FIELDS: Final = [
    pa.field("width", pa.int32(), nullable=False),  # of the original image
    pa.field("height", pa.int32(), nullable=False),
    pa.field("image_jpeg", pa.binary(), nullable=False),  # 224x224 RGB, JPEG-encoded
]

# The thumbnail recipe (decode settings and limits) an outcome was made with: a rewrite reuses a
# stored thumbnail or rejection only when the object's etag and this are unchanged. Null in rows
# written before it existed (never reused).
_DECODED_WITH_FIELD: Final = pa.field("decoded_with", pa.string(), nullable=True)

DOWNSCALED_IMAGES_SCHEMA: Final = pa.schema(_IMAGE_KEY_FIELDS + _IMAGE_PIXEL_FIELDS + [_DECODED_WITH_FIELD])

REJECTED_IMAGES_SCHEMA: Final = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=True),
        pa.field(PARTITION_COLUMN, pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        # Null where the rejection does not follow from the content alone (a storage refusal, a deleted
        # object, a duplicate id): such rows are decided again on every rewrite.
        pa.field("etag", pa.string(), nullable=True),
        _DECODED_WITH_FIELD,
    ]
)

# The sales columns every export must have; others are kept as they come.
SALES_REQUIRED_FIELDS: Final = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("sales", pa.float64(), nullable=True),
]

_EMBEDDING_FIELDS: Final = [
    pa.field("embedding", EMBEDDING_TYPE, nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
]

# Names the sales export may not use, because the joined tables own them. Compared
# case-insensitively, as Delta compares column names; a column added to the fixed
# fields above is reserved with them, and so is the column Lake adds on write.
RESERVED_SALES_COLUMNS: Final = (
    frozenset(f.name for f in _IMAGE_KEY_FIELDS + _IMAGE_PIXEL_FIELDS + _EMBEDDING_FIELDS) - {"image_id"}
) | {PARTITION_STORAGE_COLUMN}


def sales_value_fields(sales_schema: pa.Schema) -> list[pa.Field]:
    """The sales columns that are joined onto images: all but `image_id`."""
    return [f for f in sales_schema if f.name != "image_id"]


def sales_schema_of_joined(joined_schema: pa.Schema) -> pa.Schema:
    """The sales columns a joined table carries, as a sales schema (image_id first)."""
    image_columns = set(DOWNSCALED_IMAGES_SCHEMA.names)
    return pa.schema([joined_schema.field("image_id")] + [f for f in joined_schema if f.name not in image_columns])


def images_with_sales_schema(sales_schema: pa.Schema) -> pa.Schema:
    return pa.schema(_IMAGE_KEY_FIELDS + _IMAGE_PIXEL_FIELDS + sales_value_fields(sales_schema))


def image_embeddings_schema(sales_schema: pa.Schema) -> pa.Schema:
    return pa.schema(_IMAGE_KEY_FIELDS + sales_value_fields(sales_schema) + _EMBEDDING_FIELDS)


# Near-duplicate image pairs of one partition's images against the whole search
# index (imgemb_assets.core.search.near_duplicates).
NEAR_DUPLICATES: Final = "near_duplicates"

NEAR_DUPLICATES_SCHEMA: Final = pa.schema(
    [
        # The image of this partition; for a pair inside the partition, the smaller id.
        pa.field("image_id", pa.string(), nullable=False),
        pa.field(PARTITION_COLUMN, pa.string(), nullable=False),
        pa.field("other_image_id", pa.string(), nullable=False),
        pa.field("other_prefix", pa.string(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),  # cosine, as the index returned it
        pa.field("same_partition", pa.bool_(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
    ]
)


# One row per (partition, model): how well that model's vectors separate the label
# column's values (imgemb_assets.core.evaluation.scores).
EMBEDDING_EVALUATION: Final = "embedding_evaluation"

EMBEDDING_EVALUATION_SCHEMA: Final = pa.schema(
    [
        pa.field(PARTITION_COLUMN, pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("label_column", pa.string(), nullable=True),  # null when the sales table has no such column
        pa.field("weights_are_random", pa.bool_(), nullable=False),  # the scores then describe noise
        pa.field("vectors", pa.int64(), nullable=False),
        pa.field("labelled_sampled", pa.int64(), nullable=False),
        pa.field("labels", pa.int64(), nullable=False),
        pa.field("silhouette", pa.float64(), nullable=True),  # null when fewer than two labels
        pa.field("knn_agreement", pa.float64(), nullable=True),
        pa.field("knn_agreement_chance", pa.float64(), nullable=True),
        pa.field("similarity_p5", pa.float64(), nullable=True),
        pa.field("similarity_p50", pa.float64(), nullable=True),
        pa.field("similarity_p95", pa.float64(), nullable=True),
        # A CLIP's image vectors against its paired text tower's prompts, one per label value of the whole
        # sales table ("a photo of a {value}"): the share whose nearest prompt is their own label, and that
        # share under shuffled labels. Null for a model without a text tower paired with these vectors, and
        # in rows written before these columns (appended last: a merge adds them to an existing table).
        pa.field("zero_shot_agreement", pa.float64(), nullable=True),
        pa.field("zero_shot_agreement_chance", pa.float64(), nullable=True),
        pa.field("zero_shot_classes", pa.int64(), nullable=True),  # prompts scored against
    ]
)

# Made from the embeddings for what they are for (search, evaluation), per prefix like
# the pipeline's tables: a prefix removed from the root leaves these too.
DERIVED_TABLES: Final = (EMBEDDING_EVALUATION, NEAR_DUPLICATES)

# The partition scheme the lake was written with (core/ingest/scheme_record.py): one row, not partitioned.
PARTITION_SCHEME_TABLE: Final = "_partition_scheme"

PARTITION_SCHEME_TABLE_SCHEMA: Final = pa.schema(
    [
        pa.field("scheme", pa.string(), nullable=False),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
