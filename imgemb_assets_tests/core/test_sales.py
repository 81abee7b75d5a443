"""Sales export validation (clear errors for bad files), the inner join onto images (refused while the sales
table repeats an image_id), and a sales column keeping one type in every table (issue 11, items 3 and 4), on
real Delta tables."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import (
    DOWNSCALED_IMAGES_SCHEMA,
    IMAGE_EMBEDDINGS,
    IMAGES_WITH_SALES,
    SALES,
    image_embeddings_schema,
    images_with_sales_schema,
)
from imgemb_assets.core.sales.join import (
    SalesError,
    check_against_lake,
    join_with_sales,
    read_sales,
    validate_sales,
    written_sales_columns,
)
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_support.rows import downscaled_rows


def _store_with(tmp_path: Path, **files: pa.Table | bytes) -> object:
    for name, content in files.items():
        path = tmp_path / f"{name}.parquet"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            pq.write_table(content, path)
    return open_object_store(str(tmp_path))


def test_all_parquet_files_are_read_and_sales_becomes_float(tmp_path: Path) -> None:
    (tmp_path / "nested").mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "sales": [1], "category": ["x"]}), tmp_path / "part1.parquet")
    pq.write_table(pa.table({"image_id": ["b"], "sales": [2.5], "category": ["y"]}), tmp_path / "nested" / "p2.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    table = read_sales(open_object_store(str(tmp_path)))
    assert table.schema.field("sales").type == pa.float64()
    assert table.column_names == ["image_id", "sales", "category"]
    assert sorted(table.to_pylist(), key=lambda r: r["image_id"]) == [
        {"image_id": "a", "sales": 1.0, "category": "x"},
        {"image_id": "b", "sales": 2.5, "category": "y"},
    ]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"sales": [1.0]}), "required column 'image_id' is missing"),
        (pa.table({"image_id": ["a"]}), "required column 'sales' is missing"),
        (pa.table({"image_id": [1], "sales": [1.0]}), "'image_id' must be a string, found int64"),
        (pa.table({"image_id": ["a"], "sales": ["12"]}), "'sales' must be numeric, found string"),
        (
            pa.table(
                {"image_id": [None, "b"], "sales": [1.0, 2.0]},
                schema=pa.schema([("image_id", pa.string()), ("sales", pa.float64())]),
            ),
            "1 rows have no image_id",
        ),
        (pa.table({"image_id": ["a"], "sales": [1.0], "embedding": [0]}), "clash with image columns"),
    ],
)
def test_invalid_exports_fail_with_a_message_naming_the_file(table: pa.Table, message: str) -> None:
    with pytest.raises(SalesError, match=message) as error:
        validate_sales(table, source="s3://b/sales-data/x.parquet")
    assert "x.parquet" in str(error.value)


def test_unreadable_parquet_is_a_clear_error(tmp_path: Path) -> None:
    store = _store_with(tmp_path, broken=b"PAR1 this is not parquet")
    with pytest.raises(SalesError, match="broken.parquet: not a readable parquet file"):
        read_sales(store)


def test_no_parquet_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SalesError, match="no .parquet files"):
        read_sales(open_object_store(str(tmp_path)))


def test_join_is_inner_on_image_id() -> None:
    images = pa.table(
        {
            "image_id": ["b", "a", "no_sales"],
            "prefix": ["p"] * 3,
            "etag": ["e"] * 3,
            "width": pa.array([1, 2, 3], pa.int32()),
            "height": pa.array([1, 2, 3], pa.int32()),
            "image_jpeg": [b"1", b"2", b"3"],
            "decoded_with": [None] * 3,
        },
        schema=DOWNSCALED_IMAGES_SCHEMA,
    )
    sales = validate_sales(
        pa.table({"image_id": ["a", "b", "no_image"], "sales": [1, 2, 3], "region": ["x", "y", "z"]}), "s"
    )
    joined = join_with_sales(images, sales, images_with_sales_schema(sales.schema))
    assert joined.schema == images_with_sales_schema(sales.schema)
    assert joined.select(["image_id", "sales", "region", "image_jpeg"]).to_pylist() == [
        {"image_id": "a", "sales": 1.0, "region": "x", "image_jpeg": b"2"},
        {"image_id": "b", "sales": 2.0, "region": "y", "image_jpeg": b"1"},
    ]


@pytest.mark.parametrize("repeated", ["a", "no_image"], ids=["id_of_an_image_here", "id_with_no_image_here"])
def test_repeated_sales_ids_are_refused_by_the_join(repeated: str) -> None:
    # a repeat of an image's id would give that image (and later its embedding) a second row; a repeat of
    # an id with no image in this partition still refuses the join: the export is wrong for every partition
    images = downscaled_rows("p", ["a", "b"])
    sales = validate_sales(pa.table({"image_id": ["a", "b", "no_image", repeated], "sales": [1, 2, 3, 4]}), "s")
    assert sales.num_rows == 4  # validation keeps the repeat: the join is where it is refused

    with pytest.raises(SalesError, match=rf"cannot be joined: 1 image_ids appear more than once .*\['{repeated}'\]"):
        join_with_sales(images, sales, images_with_sales_schema(sales.schema))


# --- issue 11: validation is the one place that decides (item 4) -------------------------


def _publish(lake: Lake, sales_root: Path, prefix: str) -> pa.Table:
    """What the `sales` and `images_with_sales` steps do: validate, write sales, join one prefix, write it."""
    table = read_sales(open_object_store(str(sales_root)), lake)
    lake.overwrite(SALES, table)
    sales = lake.read(SALES)
    images = downscaled_rows(prefix, sales.column("image_id").to_pylist())
    lake.write_partition(
        IMAGES_WITH_SALES, join_with_sales(images, sales, images_with_sales_schema(sales.schema)), prefix
    )
    return lake.read(IMAGES_WITH_SALES, prefix)


def _export(sales_root: Path, **files: pa.Table) -> None:
    """Replace the export under `sales_root` with these files."""
    sales_root.mkdir(exist_ok=True)
    for old in sales_root.glob("*.parquet"):
        old.unlink()
    for name, table in files.items():
        pq.write_table(table, sales_root / f"{name}.parquet")


@pytest.mark.parametrize("name", ["Prefix", "ETag", "MODEL_ID", "Image_Jpeg", "Prefix_Partition"])
def test_a_reserved_name_in_another_case_is_refused(name: str) -> None:
    # Passed before; every join then failed with "Duplicate field name (case-insensitive)".
    with pytest.raises(SalesError, match=rf"\['{name}'\] clash with image columns") as error:
        validate_sales(pa.table({"image_id": ["a"], "sales": [1.0], name: ["x"]}), source="s3://b/x.parquet")
    assert "case-insensitively" in str(error.value)


def test_names_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    # Passed before; the sales write then failed.
    table = pa.table({"image_id": ["a"], "sales": [1.0], "Region": ["x"], "region": ["y"]})
    with pytest.raises(
        SalesError, match=r"x.parquet: columns \[\['Region', 'region'\]\] repeat a name, or differ only in case"
    ):
        validate_sales(table, source="s3://b/x.parquet")


def test_a_column_spelled_differently_in_two_files_is_refused(tmp_path: Path) -> None:
    _export(
        tmp_path,
        a=pa.table({"image_id": ["a"], "sales": [1.0], "Region": ["x"]}),
        b=pa.table({"image_id": ["b"], "sales": [1.0], "region": ["y"]}),
    )
    with pytest.raises(
        SalesError, match=r"column 'region' of .*b.parquet and 'Region' of .*a.parquet differ only in case"
    ):
        read_sales(open_object_store(str(tmp_path)))


def test_a_column_typed_differently_in_two_files_names_both_files(tmp_path: Path) -> None:
    # Was a raw ArrowTypeError from the concatenation.
    _export(
        tmp_path,
        a=pa.table({"image_id": ["a"], "sales": [1.0], "units": pa.array(["3"])}),
        b=pa.table({"image_id": ["b"], "sales": [1.0], "units": pa.array([4], pa.int64())}),
    )
    with pytest.raises(SalesError, match=r"column 'units' is string in .*a.parquet but int64 in .*b.parquet"):
        read_sales(open_object_store(str(tmp_path)))


def test_widths_and_encodings_are_not_types_across_files(tmp_path: Path) -> None:
    # int8 and uint32, float32 and float64, categorical and plain strings: one column each, values unchanged.
    _export(
        tmp_path,
        a=pa.table(
            {
                "image_id": ["a"],
                "sales": [1.0],
                "units": pa.array([-3], pa.int8()),
                "w": pa.array([0.5], pa.float32()),
                "c": pa.array(["x"]).dictionary_encode(),
            }
        ),
        b=pa.table(
            {
                "image_id": ["b"],
                "sales": [1.0],
                "units": pa.array([4_000_000_000], pa.uint32()),
                "w": [1e300],
                "c": pa.array(["y"], pa.large_string()),
            }
        ),
    )
    table = read_sales(open_object_store(str(tmp_path)))
    assert table.schema.field("units").type == pa.int64()
    assert table.schema.field("w").type == pa.float64()
    assert table.schema.field("c").type == pa.string()
    assert table.select(["units", "w", "c"]).to_pylist() == [
        {"units": -3, "w": 0.5, "c": "x"},
        {"units": 4_000_000_000, "w": 1e300, "c": "y"},
    ]


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (
            pa.array([1], pa.time64("us")),
            r"'opens' has type time64\[us\], which Delta cannot store \(it has no time-of-day",
        ),
        (
            pa.array([1], pa.time32("s")),
            r"'opens' has type time32\[s\], which Delta cannot store \(it has no time-of-day",
        ),
        (
            pa.array([1], pa.duration("s")),
            r"'opens' has type duration\[s\], which Delta cannot store \(it has no duration",
        ),
        (
            pa.array([2**63], pa.uint64()),
            r"'opens' \(uint64\) cannot be stored as int64 without changing .*decimal\(20, 0\)",
        ),
        (
            pa.array([1001], pa.timestamp("ns")),
            r"'opens' \(timestamp\[ns\]\) cannot be stored as .*round the values to micro",
        ),
    ],
    ids=["time64", "time32", "duration", "uint64_above_int64", "nanoseconds"],
)
def test_columns_delta_cannot_store_are_refused_by_validation(tmp_path: Path, column: pa.Array, message: str) -> None:
    # time64, duration and uint64 passed and then failed the Delta write; nanoseconds were silently truncated.
    with pytest.raises(SalesError, match=message):
        validate_sales(pa.table({"image_id": ["a"], "sales": [1.0], "opens": column}), source="s3://b/x.parquet")


def test_a_small_uint64_column_is_kept_exactly(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _export(
        tmp_path / "sales", a=pa.table({"image_id": ["a"], "sales": [1.0], "n": pa.array([2**63 - 1], pa.uint64())})
    )
    assert _publish(lake, tmp_path / "sales", "p").column("n").to_pylist() == [2**63 - 1]


def test_a_sales_figure_float64_cannot_hold_is_refused() -> None:
    # Was a raw ArrowInvalid from the cast.
    with pytest.raises(SalesError, match=r"'sales' \(int64\) cannot be stored as double.*exactly up to 2\*\*53"):
        validate_sales(pa.table({"image_id": ["a"], "sales": [2**53 + 1]}), source="s3://b/x.parquet")


def test_a_categorical_image_id_is_a_string(tmp_path: Path) -> None:
    # pandas writes a categorical as dictionary-encoded; it was refused as "must be a string".
    lake = Lake(str(tmp_path / "lake"))
    _export(tmp_path / "sales", a=pa.table({"image_id": pa.array(["a", "b"]).dictionary_encode(), "sales": [1, 2]}))
    joined = _publish(lake, tmp_path / "sales", "p")
    assert joined.select(["image_id", "sales"]).to_pylist() == [
        {"image_id": "a", "sales": 1.0},
        {"image_id": "b", "sales": 2.0},
    ]


def test_an_untyped_empty_column_is_refused_until_the_lake_types_it(tmp_path: Path) -> None:
    # Stored untyped ("void"), a later decimal written into it was read back as null.
    lake = Lake(str(tmp_path / "lake"))
    _export(tmp_path / "sales", a=pa.table({"image_id": ["a"], "sales": [1.0], "note": pa.nulls(1)}))
    with pytest.raises(SalesError, match="column 'note' has no values and no type"):
        _publish(lake, tmp_path / "sales", "p")
    _export(tmp_path / "sales", a=pa.table({"image_id": ["a"], "sales": [1.0], "note": ["kept"]}))
    _publish(lake, tmp_path / "sales", "p")
    _export(tmp_path / "sales", a=pa.table({"image_id": ["a"], "sales": [1.0], "note": pa.nulls(1)}))
    joined = _publish(lake, tmp_path / "sales", "p")
    assert joined.schema.field("note").type == pa.string()
    assert joined.column("note").to_pylist() == [None]


# --- issue 11: a sales column keeps its type in every table (item 3) ----------------------


def test_a_column_that_turns_from_int_to_float_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # Was accepted: sales showed 2.5 while images_with_sales truncated it to 2.
    lake, sales_root = Lake(str(tmp_path / "lake")), tmp_path / "sales"
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "units": [2]}))
    _publish(lake, sales_root, "p1")
    versions = {name: DeltaTable(lake.table_uri(name)).version() for name in (SALES, IMAGES_WITH_SALES)}
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "units": [2.5]}))
    with pytest.raises(SalesError) as error:
        _publish(lake, sales_root, "p2")
    message = str(error.value)
    assert "a.parquet: column 'units' is double, but the sales table already holds it as int64" in message
    assert "give the changed column a new name" in message and "nothing was written" in message
    assert {name: DeltaTable(lake.table_uri(name)).version() for name in versions} == versions
    # The way forward the message gives: a new name is a new column, with its values exactly.
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "units_exact": [2.5]}))
    assert _publish(lake, sales_root, "p1").select(["units", "units_exact"]).to_pylist() == [
        {"units": None, "units_exact": 2.5}
    ]


def test_a_wider_number_lands_exactly_where_a_narrower_one_was(tmp_path: Path) -> None:
    # float32 then 1e300 became inf in images_with_sales; int32 then 2**40 failed with a Cast error, retried forever;
    # decimal(10, 2) then decimal(12, 2) failed to merge.
    lake, sales_root = Lake(str(tmp_path / "lake")), tmp_path / "sales"
    narrow = {
        "w": pa.array([0.5], pa.float32()),
        "n": pa.array([7], pa.int32()),
        "d": pa.array([Decimal("1")], pa.decimal128(10, 2)),
    }
    wide = {
        "w": pa.array([1e300]),
        "n": pa.array([2**40]),
        "d": pa.array([Decimal("1234567890.12")], pa.decimal128(12, 2)),
    }
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], **narrow}))
    _publish(lake, sales_root, "p1")
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], **wide}))
    joined = _publish(lake, sales_root, "p2")
    assert joined.select(["w", "n", "d"]).to_pylist() == [{"w": 1e300, "n": 2**40, "d": Decimal("1234567890.12")}]
    assert lake.read(SALES).select(["w", "n", "d"]).to_pylist() == joined.select(["w", "n", "d"]).to_pylist()


def test_a_column_that_turns_from_string_to_int_is_refused(tmp_path: Path) -> None:
    # Was a Cast error at every partition's write, retried as transient.
    lake, sales_root = Lake(str(tmp_path / "lake")), tmp_path / "sales"
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "code": ["7"]}))
    _publish(lake, sales_root, "p1")
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "code": [7]}))
    with pytest.raises(
        SalesError, match="a.parquet: column 'code' is int64, but the sales table already holds it as string"
    ):
        _publish(lake, sales_root, "p2")


def test_a_column_dropped_and_brought_back_with_another_type_is_refused(tmp_path: Path) -> None:
    # `sales` forgets a dropped column; the joined tables keep it, and would cast the new values to its old type.
    lake, sales_root = Lake(str(tmp_path / "lake")), tmp_path / "sales"
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "units": [2]}))
    _publish(lake, sales_root, "p1")
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0]}))
    _publish(lake, sales_root, "p1")
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "units": [2.5]}))
    with pytest.raises(
        SalesError,
        match="a.parquet: column 'units' is double, but the images_with_sales table already holds it as int64",
    ):
        _publish(lake, sales_root, "p1")


def test_a_column_only_image_embeddings_still_holds_keeps_its_type(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    held = pa.schema([pa.field("image_id", pa.string(), nullable=False), pa.field("units", pa.int64())])
    embeddings = pa.table(
        {"image_id": ["a"], "prefix": ["p"], "etag": ["e"], "units": [2], "embedding": [[0.0]], "model_id": ["m"]},
        schema=image_embeddings_schema(held),
    )
    lake.write_partition(IMAGE_EMBEDDINGS, embeddings, "p")
    assert written_sales_columns(lake) == {IMAGE_EMBEDDINGS: pa.schema([pa.field("units", pa.int64())])}
    export = validate_sales(pa.table({"image_id": ["a"], "sales": [1.0], "units": [2.5]}), "s3://b/x.parquet")
    with pytest.raises(SalesError, match="the image_embeddings table already holds it as int64"):
        check_against_lake(export, written_sales_columns(lake), source="s3://b/x.parquet")


def test_a_column_respelled_in_another_case_is_refused(tmp_path: Path) -> None:
    # Was accepted; the join's merge then failed with "Duplicate field name (case-insensitive)" on every partition.
    lake, sales_root = Lake(str(tmp_path / "lake")), tmp_path / "sales"
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "Region": ["x"]}))
    _publish(lake, sales_root, "p1")
    _export(sales_root, a=pa.table({"image_id": ["a"], "sales": [1.0], "region": ["x"]}))
    with pytest.raises(SalesError, match="a.parquet: column 'region' is spelled 'Region' in the sales table"):
        _publish(lake, sales_root, "p1")
