"""Reading and validating the sales export, and joining it onto images.

Validation is the one place that decides whether an export can be used: what it
accepts, the `sales` Delta table and the joined tables (`images_with_sales`,
`image_embeddings`) can store without changing a value, and what it refuses is
refused with a `SalesError` naming the file, the column and the way out, before
anything is written.

Every sales column is stored as one canonical Delta type (`storable_type`), so
exports that differ only in encoding or width (int32 vs int64, a pandas
categorical vs plain strings) keep one schema. A column's canonical type may not
change once the lake holds it (`check_against_lake`): the joined tables merge
their schemas, and delta-rs casts new data to the type it saw first (2.5 → 2,
1e300 → inf, or a `Cast error` on every partition). That is Delta's own schema
enforcement, applied to the export once, before any write, rather than left to
fail (or cast) the write of each partition.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Final, cast

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import (
    IMAGE_EMBEDDINGS,
    IMAGES_WITH_SALES,
    RESERVED_SALES_COLUMNS,
    SALES,
    SALES_REQUIRED_FIELDS,
)
from imgemb_assets.core.quality.checks import duplicate_image_ids
from imgemb_assets.core.storage.objects import ObjectInfo, ObjectStore

# Delta compares column names case-insensitively ("Duplicate field name
# (case-insensitive)"), with Unicode lower-casing, as str.lower does.
_RESERVED_FOLDED: Final = frozenset(name.lower() for name in RESERVED_SALES_COLUMNS)
_IMAGE_ID: Final = "image_id"
_SALES: Final = "sales"
_DELTA_MAX_DECIMAL_DIGITS: Final = 38
# Where a column's type may be fixed already; the joined tables hold the sales
# columns next to their own, which are never sales columns.
_TABLES_HOLDING_SALES_COLUMNS: Final = (SALES, IMAGES_WITH_SALES, IMAGE_EMBEDDINGS)
_WAY_FORWARD: Final = (
    "Either keep the column's type, or give the changed column a new name (it is added to the tables; the old "
    "column stays, null in every re-joined partition), or start the column over: delete the sales, "
    "images_with_sales and image_embeddings tables under the lake root and run "
    "`imgemb backfill-missing --asset image_embeddings` (every vector is computed again)"
)


class SalesError(ValueError):
    """The sales export cannot be used; the message names the file and the problem."""


class _Unstorable(Exception):
    """An Arrow type no Delta column can hold; the message says what to write instead."""


def list_sales_files(store: ObjectStore) -> list[ObjectInfo]:
    return [obj for obj in store.list_objects("") if obj.key.lower().endswith(".parquet")]


def read_sales(store: ObjectStore, lake: Lake | None = None, files: Sequence[ObjectInfo] | None = None) -> pa.Table:
    """Every parquet file under the sales root (or exactly `files`, a listing the caller
    already made and reports), validated, agreed on and concatenated.

    Checked against the sales columns the tables of `lake` already hold;
    without a lake, as if it were empty.
    """
    files = list_sales_files(store) if files is None else files
    if not files:
        raise SalesError(f"no .parquet files under the sales root {store.root_uri}")
    written = written_sales_columns(lake) if lake is not None else {}
    validated = []
    for obj in files:
        table = validate_sales(_read_parquet(store, obj), source=obj.uri)
        check_against_lake(table, written, source=obj.uri)
        validated.append((obj.uri, table))
    return type_empty_columns(combine_sales(validated), written)


def validate_sales(table: pa.Table, source: str) -> pa.Table:
    """One file: a string `image_id` on every row, a numeric `sales`, every column in its canonical type.

    `sales` becomes float64 so exports that alternate between integer and
    decimal figures keep one Delta schema. A column with no values and no type
    (parquet's null type) stays null here: `type_empty_columns` types it.
    """
    _check_names(table.column_names, source)
    columns: list[pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for field, column in zip(table.schema, table.columns):
        target = _required_type(field, source) if field.name in (_IMAGE_ID, _SALES) else _storable(field, source)
        columns.append(_cast(column, target, field, source))
        # image_id is required on every row; any other column may be empty on some.
        fields.append(pa.field(field.name, target, nullable=field.name != _IMAGE_ID))
    missing_ids = table.column(_IMAGE_ID).null_count
    if missing_ids:
        raise SalesError(f"{source}: {missing_ids} rows have no image_id")
    # Built anew so the file's schema metadata (pandas' index, writer notes) is not carried along.
    result = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    return result.select([_IMAGE_ID, *[name for name in result.column_names if name != _IMAGE_ID]])


def combine_sales(files: Sequence[tuple[str, pa.Table]]) -> pa.Table:
    """Validated files, as one table; each column must have one spelling and one type in all of them."""
    first_seen: dict[str, tuple[str, pa.Field]] = {}
    for source, table in files:
        for field in table.schema:
            key = field.name.lower()
            if key not in first_seen:
                first_seen[key] = (source, field)
                continue
            other_source, other = first_seen[key]
            if field.name != other.name:
                raise SalesError(
                    f"column {field.name!r} of {source} and {other.name!r} of {other_source} differ only in case; "
                    "Delta compares column names case-insensitively: spell it the same way in every file"
                )
            if pa.types.is_null(other.type):
                first_seen[key] = (source, field)  # compare later files against a typed one
            elif not pa.types.is_null(field.type) and field.type != other.type:
                raise SalesError(
                    f"column {field.name!r} is {other.type} in {other_source} but {field.type} in {source} "
                    "(after each is widened to the type Delta stores); write it with one type in every file"
                )
    # Types agree, so the only promotion left is a file's all-null column taking the others' type.
    return pa.concat_tables([table for _, table in files], promote_options="permissive")


def check_against_lake(sales: pa.Table, written: Mapping[str, pa.Schema], source: str) -> None:
    """Refuse a validated file whose column a table in the lake holds under another spelling or type.

    `written` maps each table already in the lake to the sales columns it holds
    (`written_sales_columns`). Columns with no type are left to `type_empty_columns`.
    """
    held = _held_columns(written)
    for field in sales.schema:
        if field.name == _IMAGE_ID:
            continue
        for table_name, old in held.get(field.name.lower(), []):
            if old.name != field.name:
                raise SalesError(
                    f"{source}: column {field.name!r} is spelled {old.name!r} in the {table_name} table; Delta "
                    f"compares names case-insensitively: spell it {old.name!r} again, or use another name"
                )
            if not pa.types.is_null(field.type) and _comparable(old.type) != _comparable(field.type):
                raise SalesError(
                    f"{source}: column {field.name!r} is {field.type}, but the {table_name} table already holds it "
                    f"as {old.type}; Delta would cast new values to {old.type}, so the export is refused and "
                    f"nothing was written. {_WAY_FORWARD}"
                )


def type_empty_columns(sales: pa.Table, written: Mapping[str, pa.Schema]) -> pa.Table:
    """The export with each column that has no type in any file (parquet's null type) typed as the lake holds it.

    Refused where the lake does not hold it: stored untyped ("void"), a later
    decimal written into the column would be read back as null.
    """
    held = _held_columns(written)
    for index, field in enumerate(sales.schema):
        if not pa.types.is_null(field.type):
            continue
        typed = [old.type for _, old in held.get(field.name.lower(), []) if not pa.types.is_null(old.type)]
        if not typed:
            raise SalesError(
                f"column {field.name!r} has no values and no type in any sales file (parquet's null type), and no "
                "table in the lake holds it yet: give it a type in the export (in pandas e.g. .astype('string') "
                "or 'Float64'), or leave the column out"
            )
        sales = sales.set_column(index, field.with_type(typed[0]), pa.nulls(sales.num_rows, typed[0]))
    return sales


def written_sales_columns(lake: Lake) -> dict[str, pa.Schema]:
    """The sales columns (image_id aside) each table already in the lake holds, by table name."""
    written: dict[str, pa.Schema] = {}
    for name in _TABLES_HOLDING_SALES_COLUMNS:
        try:
            schema = lake.read_batches(name).schema  # only the log is read: the stream is never consumed
        except LakeError:
            continue
        owned = {_IMAGE_ID} if name == SALES else {_IMAGE_ID, *RESERVED_SALES_COLUMNS}
        written[name] = pa.schema([field for field in schema if field.name not in owned])
    return written


def _held_columns(written: Mapping[str, pa.Schema]) -> dict[str, list[tuple[str, pa.Field]]]:
    held: dict[str, list[tuple[str, pa.Field]]] = {}
    for table_name, schema in written.items():
        for field in schema:
            held.setdefault(field.name.lower(), []).append((table_name, field))
    return held


def storable_type(type_: pa.DataType) -> pa.DataType:
    """The one Delta-storable type a sales column of this Arrow type is kept as.

    Encodings (dictionary, views, large offsets) and widths are not types to a
    reader of the tables: each maps to the widest of its kind, so the values
    are kept exactly and a change of width between exports is not a change of
    type. Raises `_Unstorable` for what Delta has no type for.
    """
    return _storable_type(type_, nested=False)


def join_with_sales(images: pa.Table, sales: pa.Table, schema: pa.Schema) -> pa.Table:
    """Inner join on image_id, as the article does, in image_id order.

    Refused when sales repeats an image_id: each repeat would silently add a
    copy of the image (and later of its embedding) to the partition.
    """
    unique_ids = duplicate_image_ids(sales)
    if not unique_ids.passed:
        raise SalesError(f"the sales table cannot be joined: {unique_ids.description}; fix the export")
    # from_arrow gives a DataFrame for a Table (a Series only for an Array)
    left, right = cast(pl.DataFrame, pl.from_arrow(images)), cast(pl.DataFrame, pl.from_arrow(sales))
    joined = left.join(right, on="image_id", how="inner").sort("image_id")
    return joined.to_arrow().select(schema.names).cast(schema)


def _check_names(names: Sequence[str], source: str) -> None:
    # Delta stores a column named "", but polars renames it (column_N) on the way into the
    # join, so every join of the partitions would fail on a column it cannot find.
    if "" in names:
        raise SalesError(f"{source}: a column has no name (''): name it in the export, or leave it out")
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(name.lower(), []).append(name)
    clashing = [group for group in spellings.values() if len(group) > 1]
    if clashing:
        raise SalesError(
            f"{source}: columns {clashing} repeat a name, or differ only in case; Delta compares column names "
            "case-insensitively: keep one of each"
        )
    reserved = sorted(name for name in names if name.lower() in _RESERVED_FOLDED)
    if reserved:
        raise SalesError(
            f"{source}: columns {reserved} clash with image columns {sorted(RESERVED_SALES_COLUMNS)} (compared "
            "case-insensitively); rename them in the export"
        )
    for field in SALES_REQUIRED_FIELDS:
        if field.name not in names:
            found = spellings.get(field.name.lower())
            hint = f" (found {found[0]!r}: the name is lower case)" if found else ""
            raise SalesError(f"{source}: required column {field.name!r} is missing{hint} (columns: {sorted(names)})")


def _required_type(field: pa.Field, source: str) -> pa.DataType:
    value_type = _decoded(field.type)
    if field.name == _IMAGE_ID:
        if (
            pa.types.is_string(value_type)
            or pa.types.is_large_string(value_type)
            or pa.types.is_string_view(value_type)
        ):
            return pa.string()
        raise SalesError(f"{source}: column 'image_id' must be a string, found {field.type}")
    if pa.types.is_integer(value_type) or pa.types.is_floating(value_type) or pa.types.is_decimal(value_type):
        return pa.float64()
    if pa.types.is_null(value_type):
        return pa.float64()  # no figures in this file: nothing to convert
    raise SalesError(f"{source}: column 'sales' must be numeric, found {field.type}")


def _storable(field: pa.Field, source: str) -> pa.DataType:
    try:
        return storable_type(field.type)
    except _Unstorable as exc:
        raise SalesError(f"{source}: column {field.name!r} has type {field.type}, which {exc}") from exc


def _cast(column: pa.ChunkedArray, target: pa.DataType, field: pa.Field, source: str) -> pa.ChunkedArray:
    # A safe cast refuses to change a value (overflow, lost precision): that is the point.
    try:
        return column.cast(target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise SalesError(
            f"{source}: column {field.name!r} ({field.type}) cannot be stored as {target} without changing its "
            f"values: {exc}. {_cast_hint(field)}"
        ) from exc


def _cast_hint(field: pa.Field) -> str:
    type_ = _decoded(field.type)
    if field.name == _SALES:
        return "sales figures are stored as float64, which holds integers exactly up to 2**53"
    if pa.types.is_unsigned_integer(type_):
        return "Delta's widest integer is a signed 64-bit long: write the column as a decimal(20, 0) or a string"
    if pa.types.is_timestamp(type_):
        return "Delta stores timestamps in microseconds from year 1 to 9999: round the values to microseconds"
    if pa.types.is_date(type_):
        return "Delta stores dates as whole days: write the column as a timestamp"
    if pa.types.is_decimal(type_):
        return (
            f"Delta decimals hold at most {_DELTA_MAX_DECIMAL_DIGITS} digits: write the column as float64 or a string"
        )
    return "write the column with a type Delta stores (integer, float, decimal, string, binary, bool, date, timestamp)"


def _decoded(type_: pa.DataType) -> pa.DataType:
    # Dictionary encoding (a pandas categorical) is how values are stored in the file, not what they are.
    return _decoded(type_.value_type) if pa.types.is_dictionary(type_) else type_


def _storable_type(type_: pa.DataType, nested: bool) -> pa.DataType:
    type_ = _decoded(type_)
    if pa.types.is_null(type_):
        if nested:
            raise _Unstorable("Delta cannot store (a field with no type): give the nested field a type")
        return type_  # typed as the lake holds the column, if it does (type_empty_columns)
    if pa.types.is_boolean(type_):
        return pa.bool_()
    if pa.types.is_integer(type_):
        return pa.int64()
    if pa.types.is_floating(type_):
        return pa.float64()
    if pa.types.is_decimal(type_):
        if type_.scale > _DELTA_MAX_DECIMAL_DIGITS:
            raise _Unstorable(
                f"Delta cannot store (decimals have at most {_DELTA_MAX_DECIMAL_DIGITS} digits after the point): "
                "write it as float64 or a string"
            )
        # Negative scales (whole hundreds, say) become scale 0: the same values.
        return pa.decimal128(_DELTA_MAX_DECIMAL_DIGITS, max(type_.scale, 0))
    if pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return pa.string()
    if (
        pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
        or pa.types.is_binary_view(type_)
        or pa.types.is_fixed_size_binary(type_)
    ):
        return pa.binary()
    if pa.types.is_date(type_):
        return pa.date32()
    if pa.types.is_timestamp(type_):
        # Delta has two timestamp types: an instant (stored in UTC) and a local date-time.
        return pa.timestamp("us", tz=None if type_.tz is None else "UTC")
    if pa.types.is_time(type_):
        raise _Unstorable(
            "Delta cannot store (it has no time-of-day type): write it as a string ('14:30:00') or as an integer "
            "count since midnight, in a unit the column's name says (e.g. 'opens_s')"
        )
    if pa.types.is_duration(type_) or pa.types.is_interval(type_):
        raise _Unstorable(
            "Delta cannot store (it has no duration type): write it as an integer in a unit the column's name "
            "says (e.g. 'delay_ms')"
        )
    if (
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
        or pa.types.is_list_view(type_)
        or pa.types.is_large_list_view(type_)
    ):
        return pa.list_(_storable_type(type_.value_type, nested=True))
    if pa.types.is_struct(type_):
        return _storable_struct(type_)
    if pa.types.is_map(type_):
        return pa.map_(_storable_type(type_.key_type, nested=True), _storable_type(type_.item_type, nested=True))
    raise _Unstorable(
        "Delta cannot store: write it as one of integer, float, decimal, string, binary, bool, date, timestamp"
    )


def _storable_struct(type_: pa.StructType) -> pa.DataType:
    names = [type_.field(i).name for i in range(type_.num_fields)]
    if not names:
        raise _Unstorable("Delta cannot store (a struct with no fields): leave the column out")
    if len({name.lower() for name in names}) != len(names):
        raise _Unstorable(f"Delta cannot store (fields {names} repeat a name, compared case-insensitively)")
    return pa.struct([pa.field(name, _storable_type(type_.field(i).type, nested=True)) for i, name in enumerate(names)])


def _comparable(type_: pa.DataType) -> pa.DataType:
    """A type as Delta knows it: no nullability or item names inside, views read as plain strings and bytes."""
    if pa.types.is_string_view(type_) or pa.types.is_large_string(type_):
        return pa.string()
    if pa.types.is_binary_view(type_) or pa.types.is_large_binary(type_):
        return pa.binary()
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return pa.list_(_comparable(type_.value_type))
    if pa.types.is_struct(type_):
        fields = [type_.field(i) for i in range(type_.num_fields)]
        return pa.struct([pa.field(field.name, _comparable(field.type)) for field in fields])
    if pa.types.is_map(type_):
        return pa.map_(_comparable(type_.key_type), _comparable(type_.item_type))
    return type_


def _read_parquet(store: ObjectStore, obj: ObjectInfo) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(store.read_bytes(obj.uri)))
    except (pa.ArrowException, OSError) as exc:
        raise SalesError(f"{obj.uri}: not a readable parquet file: {exc}") from exc
