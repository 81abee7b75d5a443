"""Sales export validation (clear errors for bad files) and the inner join onto images."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgemb_assets.core.sales import SalesError, join_with_sales, read_sales, validate_sales
from imgemb_assets.core.storage import open_object_store
from imgemb_assets.core.tables import DOWNSCALED_IMAGES_SCHEMA, images_with_sales_schema


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
        (pa.table({"image_id": [None, "b"], "sales": [1.0, 2.0]}, schema=pa.schema([("image_id", pa.string()), ("sales", pa.float64())])), "1 rows have no image_id"),
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
        },
        schema=DOWNSCALED_IMAGES_SCHEMA,
    )
    sales = validate_sales(pa.table({"image_id": ["a", "b", "no_image"], "sales": [1, 2, 3], "region": ["x", "y", "z"]}), "s")
    joined = join_with_sales(images, sales, images_with_sales_schema(sales.schema))
    assert joined.schema == images_with_sales_schema(sales.schema)
    assert joined.select(["image_id", "sales", "region", "image_jpeg"]).to_pylist() == [
        {"image_id": "a", "sales": 1.0, "region": "x", "image_jpeg": b"2"},
        {"image_id": "b", "sales": 2.0, "region": "y", "image_jpeg": b"1"},
    ]
