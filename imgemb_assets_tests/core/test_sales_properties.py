"""Generated sales exports through validation, the `sales` Delta table and a joined partition (issue 11).

Each example is one to three exports in a row, of one to three parquet files each,
with columns drawn from every Arrow type a parquet writer produces (integers of
every width, uint64 past int64, floats, decimals, strings in every encoding,
binary, bool, date, timestamps, time-of-day, duration, the null type), names that
clash in case with each other or with the image columns, nulls, and column types
that drift between files and between exports. Every export is published as the
`sales` and `images_with_sales` steps do, on real Delta tables in a temporary
lake. The outcome is compared with a small model of the rules, written apart
from the code: an export the model accepts is written, and every value reads
back from both tables as it was given; one it refuses raises `SalesError` and
leaves both tables at their previous version. Any other exception fails the test.
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import (
    IMAGES_WITH_SALES,
    RESERVED_SALES_COLUMNS,
    SALES,
    images_with_sales_schema,
)
from imgemb_assets.core.sales.join import SalesError, join_with_sales, read_sales
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_support.rows import downscaled_rows

_EPOCH = dt.datetime(1970, 1, 1)
_INT64_MAX = 2**63 - 1
_UNSTORABLE = "unstorable"
_NULL = "null"


@dataclass(frozen=True)
class ColumnSpec:
    """A way a column can come out of a parquet writer, and what the model expects of it."""

    label: str
    kind: str  # the model's notion of one stored type: widths and encodings do not matter
    values: st.SearchStrategy[Any]
    build: Callable[[list[Any]], pa.Array]
    expect: Callable[[Any], Any] = lambda value: value
    refused_value: Callable[[Any], bool] = lambda value: False


def _typed(type_: pa.DataType) -> Callable[[list[Any]], pa.Array]:
    return lambda values: pa.array(values, type_)


def _int_spec(type_: pa.DataType) -> ColumnSpec:
    bits = type_.bit_width
    low, high = (0, 2**bits - 1) if pa.types.is_unsigned_integer(type_) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return ColumnSpec(str(type_), "int", st.integers(low, high), _typed(type_), refused_value=lambda v: v > _INT64_MAX)


def _timestamp_spec(unit: str, tz: str | None) -> ColumnSpec:
    per_us = {"s": 1_000_000, "ms": 1_000, "us": 1}
    if unit == "ns":
        # Mostly whole microseconds; now and then one Delta cannot hold.
        ticks = st.integers(0, 4 * 10**12).map(lambda us: us * 1000) | st.integers(0, 4 * 10**15)

        def as_us(ticks_: int) -> int:
            return ticks_ // 1000

    else:
        ticks = st.integers(0, 4 * 10**15 // per_us[unit])

        def as_us(ticks_: int) -> int:
            return ticks_ * per_us[unit]

    def expect(ticks_: int) -> dt.datetime:
        local = _EPOCH + dt.timedelta(microseconds=as_us(ticks_))
        return local if tz is None else local.replace(tzinfo=dt.UTC)

    return ColumnSpec(
        f"timestamp[{unit}, {tz}]",
        "timestamp" if tz is None else "timestamp_utc",
        ticks,
        _typed(pa.timestamp(unit, tz=tz)),
        expect,
        refused_value=lambda t: unit == "ns" and t % 1000 != 0,
    )


def _decimal_spec(precision: int, scale: int) -> ColumnSpec:
    # Built from strings: Decimal arithmetic, negation included, rounds to 28 digits.
    low, high = (Decimal(f"{sign}{10**precision - 1}e-{scale}") for sign in "-+")
    values = st.decimals(min_value=low, max_value=high, places=scale, allow_nan=False, allow_infinity=False)
    return ColumnSpec(
        f"decimal({precision}, {scale})", f"decimal_{scale}", values, _typed(pa.decimal128(precision, scale))
    )


def _float_expect(value: float) -> Any:
    return "NaN" if math.isnan(value) else value


_TEXT = st.text(max_size=4)
_SPECS = [
    *[_int_spec(t) for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint32(), pa.uint64())],
    ColumnSpec("float16", "float", st.sampled_from([0.5, -2.0, 65504.0]), _typed(pa.float16())),
    ColumnSpec("float32", "float", st.floats(width=32), _typed(pa.float32()), _float_expect),
    ColumnSpec("float64", "float", st.floats(), _typed(pa.float64()), _float_expect),
    _decimal_spec(5, 2),
    _decimal_spec(20, 2),
    _decimal_spec(38, 0),
    ColumnSpec("string", "string", _TEXT, _typed(pa.string())),
    ColumnSpec("large_string", "string", _TEXT, _typed(pa.large_string())),
    ColumnSpec("string_view", "string", _TEXT, _typed(pa.string_view())),
    ColumnSpec("categorical", "string", _TEXT, lambda values: pa.array(values, pa.string()).dictionary_encode()),
    ColumnSpec("binary", "binary", st.binary(max_size=4), _typed(pa.binary())),
    ColumnSpec("fixed_size_binary", "binary", st.binary(min_size=2, max_size=2), _typed(pa.binary(2))),
    ColumnSpec("bool", "bool", st.booleans(), _typed(pa.bool_())),
    ColumnSpec(
        "date32",
        "date",
        st.integers(-100_000, 100_000),
        _typed(pa.date32()),
        lambda d: dt.date(1970, 1, 1) + dt.timedelta(days=d),
    ),
    _timestamp_spec("us", None),
    _timestamp_spec("ms", None),
    _timestamp_spec("ns", "UTC"),
    _timestamp_spec("s", "Europe/Paris"),
    ColumnSpec("time64", _UNSTORABLE, st.integers(0, 86_399_999_999), _typed(pa.time64("us"))),
    ColumnSpec("duration", _UNSTORABLE, st.integers(-(10**9), 10**9), _typed(pa.duration("s"))),
    ColumnSpec("null", _NULL, st.none(), lambda values: pa.nulls(len(values))),
]
# Mostly ordinary names, so that most exports get as far as the tables; some clash in case.
_NAMES = ["units"] * 4 + ["price"] * 4 + ["region"] * 4 + ["Units", "REGION", "Prefix", "ETag", "Sales", "model_id"]
_SALES_SPECS = [
    ColumnSpec("sales int64", "float", st.integers(-(2**53), 2**53), _typed(pa.int64()), float),
    ColumnSpec("sales int32", "float", st.integers(-(2**31), 2**31 - 1), _typed(pa.int32()), float),
    ColumnSpec("sales float64", "float", st.floats(), _typed(pa.float64()), _float_expect),
    ColumnSpec("sales null", "float", st.none(), lambda values: pa.nulls(len(values))),
]
_IMAGE_ID_TYPES = [pa.string(), pa.large_string(), pa.dictionary(pa.int8(), pa.string())]


@dataclass(frozen=True)
class SalesFile:
    name: str
    image_ids: list[str]
    image_id_type: pa.DataType
    sales: tuple[ColumnSpec, list[Any]]
    columns: list[tuple[str, ColumnSpec, list[Any]]]

    def table(self) -> pa.Table:
        ids = pa.array(self.image_ids, pa.string())
        if pa.types.is_dictionary(self.image_id_type):
            ids = ids.dictionary_encode()
        else:
            ids = ids.cast(self.image_id_type)
        spec, values = self.sales
        arrays = [ids, spec.build(values)] + [spec.build(values) for _, spec, values in self.columns]
        return pa.Table.from_arrays(arrays, names=["image_id", "sales"] + [name for name, _, _ in self.columns])


def _nullable(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | values


@st.composite
def _exports(draw: st.DrawFn) -> list[list[SalesFile]]:
    plan: dict[str, ColumnSpec] = {}  # a column keeps its spec across files and exports, but for drift
    exports = []
    for export in range(draw(st.integers(1, 3))):
        files = []
        for index in range(draw(st.integers(1, 3))):
            rows = draw(st.integers(1, 3))
            columns = []
            for name in draw(st.lists(st.sampled_from(_NAMES), max_size=3, unique=True)):
                if name not in plan or draw(st.integers(0, 7)) == 0:
                    plan[name] = draw(st.sampled_from(_SPECS))
                spec = plan[name]
                columns.append((name, spec, draw(st.lists(_nullable(spec.values), min_size=rows, max_size=rows))))
            sales_spec = draw(st.sampled_from(_SALES_SPECS))
            sales_values = draw(st.lists(_nullable(sales_spec.values), min_size=rows, max_size=rows))
            files.append(
                SalesFile(
                    name=f"part-{index}",
                    image_ids=[f"img-{export}-{index}-{row}" for row in range(rows)],
                    image_id_type=draw(st.sampled_from(_IMAGE_ID_TYPES)),
                    sales=(sales_spec, sales_values),
                    columns=columns,
                )
            )
        exports.append(files)
    return exports


# --- the model: which exports the rules accept, and what the lake then holds ------------

_RESERVED = {name.lower() for name in RESERVED_SALES_COLUMNS}


def _accepted(files: list[SalesFile], held: dict[str, tuple[str, str]]) -> bool:
    """`held`: for each lower-cased column name the lake holds, its spelling and kind."""
    spelling: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for file in files:
        lowered = ["image_id", "sales"] + [name.lower() for name, _, _ in file.columns]
        if len(set(lowered)) != len(lowered):
            return False
        for name, spec, values in file.columns:
            key = name.lower()
            if key in _RESERVED or spec.kind == _UNSTORABLE:
                return False
            if any(value is not None and spec.refused_value(value) for value in values):
                return False
            if spelling.setdefault(key, name) != name:
                return False
            if spec.kind != _NULL and kinds.setdefault(key, spec.kind) != spec.kind:
                return False
    for key, name in spelling.items():
        kind = kinds.get(key, _NULL)
        if key in held and (held[key][0] != name or kind not in (_NULL, held[key][1])):
            return False
        if kind == _NULL and key not in held:
            return False
    return True


def _hold(files: list[SalesFile], held: dict[str, tuple[str, str]]) -> None:
    for file in files:
        for name, spec, _ in file.columns:
            if spec.kind != _NULL:
                held[name.lower()] = (name, spec.kind)


def _expected_rows(files: list[SalesFile]) -> dict[str, dict[str, Any]]:
    names = {name for file in files for name, _, _ in file.columns}
    rows: dict[str, dict[str, Any]] = {}
    for file in files:
        sales_spec, sales_values = file.sales
        for row, image_id in enumerate(file.image_ids):
            values = {name: None for name in names}
            values["sales"] = _expected(sales_spec, sales_values[row])
            for name, spec, column in file.columns:
                values[name] = _expected(spec, column[row])
            rows[image_id] = values
    return rows


def _expected(spec: ColumnSpec, value: Any) -> Any:
    return None if value is None else spec.expect(value)


def _read_back(value: Any) -> Any:
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


# --- publishing, as the `sales` and `images_with_sales` steps do ------------------------


def _write_export(root: Path, files: list[SalesFile]) -> None:
    root.mkdir(parents=True)
    for file in files:
        pq.write_table(file.table(), root / f"{file.name}.parquet")


def _versions(lake: Lake) -> dict[str, int | None]:
    return {
        name: DeltaTable(lake.table_uri(name)).version() if lake.exists(name) else None
        for name in (SALES, IMAGES_WITH_SALES)
    }


def _publish(lake: Lake, sales_root: Path, prefix: str) -> None:
    table = read_sales(open_object_store(str(sales_root)), lake)
    lake.overwrite(SALES, table)
    sales = lake.read(SALES)
    images = downscaled_rows(prefix, sorted(sales.column("image_id").to_pylist()))
    lake.write_partition(
        IMAGES_WITH_SALES, join_with_sales(images, sales, images_with_sales_schema(sales.schema)), prefix
    )


def _assert_tables_hold(lake: Lake, prefix: str, expected: dict[str, dict[str, Any]]) -> None:
    sales = lake.read(SALES)
    joined = lake.read(IMAGES_WITH_SALES, prefix)
    names = next(iter(expected.values())).keys()
    assert set(sales.column_names) == {"image_id", *names}
    for table in (sales, joined):
        assert table.num_rows == len(expected)
        for row in table.to_pylist():
            assert {name: _read_back(row[name]) for name in names} == expected[row["image_id"]]
    # The joined table keeps each column as `sales` holds it: nothing is cast on the way.
    for name in names:
        assert joined.schema.field(name).type == sales.schema.field(name).type, name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_exports())
def test_every_export_is_stored_exactly_or_refused_with_a_sales_error(exports: list[list[SalesFile]]) -> None:
    held: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="imgemb-sales-prop-") as tmp:
        lake = Lake(f"{tmp}/lake")
        for index, files in enumerate(exports):
            sales_root, prefix = Path(tmp) / f"sales-{index}", f"p{index}"
            _write_export(sales_root, files)
            before = _versions(lake)
            accepted = _accepted(files, held)
            try:
                _publish(lake, sales_root, prefix)
            except SalesError as error:
                assert not accepted, f"refused an export the rules accept: {error}"
                assert _versions(lake) == before  # nothing written
                event(f"export {index} refused")
                continue
            assert accepted, "wrote an export the rules refuse"
            _assert_tables_hold(lake, prefix, _expected_rows(files))
            _hold(files, held)
            event(f"export {index} written")
