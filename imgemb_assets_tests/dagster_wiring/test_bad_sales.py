"""A bad sales export fails the `sales` step at once (no retry), says why, and leaves the table as it was."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterEventType, DagsterInstance
from deltalake import DeltaTable

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions

defs = build_definitions(LocationSettings())


def _without_sales_column(table: pa.Table) -> pa.Table:
    return table.drop_columns(["sales"])


def _numeric_image_ids(table: pa.Table) -> pa.Table:
    return table.set_column(0, "image_id", pa.array(range(table.num_rows), pa.int64()))


def _sales_as_text(table: pa.Table) -> pa.Table:
    index = table.schema.get_field_index("sales")
    return table.set_column(index, "sales", table.column("sales").cast(pa.string()))


def _price_as_text(table: pa.Table) -> pa.Table:
    # issue 11 item 3: accepted before, then cast back (or failed, retried) in the joined tables.
    index = table.schema.get_field_index("price")
    return table.set_column(index, "price", table.column("price").cast(pa.string()))


def _prefix_column(table: pa.Table) -> pa.Table:
    # issue 11 item 4: passed, then every join failed with "Duplicate field name (case-insensitive)".
    return table.append_column("Prefix", pa.array(["x"] * table.num_rows))


def _opening_time(table: pa.Table) -> pa.Table:
    # issue 11 item 4: passed, then the Delta write failed.
    return table.append_column("opens", pa.array([0] * table.num_rows, pa.time64("us")))


def _unnamed_column(table: pa.Table) -> pa.Table:
    # issue 23 item 7: passed, then every join failed (polars renames a column named "").
    return table.append_column("", pa.array(["x"] * table.num_rows))


@pytest.mark.parametrize(
    ("break_export", "message"),
    [
        (_without_sales_column, "required column 'sales' is missing"),
        (_numeric_image_ids, "column 'image_id' must be a string, found int64"),
        (_sales_as_text, "column 'sales' must be numeric, found string"),
        (None, "not a readable parquet file"),
        (_price_as_text, "column 'price' is string, but the sales table already holds it as double"),
        (_prefix_column, "columns ['Prefix'] clash with image columns"),
        (_opening_time, "column 'opens' has type time64[us], which Delta cannot store"),
        (_unnamed_column, "a column has no name (''): name it in the export, or leave it out"),
    ],
    ids=[
        "missing_column",
        "mistyped_image_id",
        "mistyped_sales",
        "unreadable",
        "type_drift",
        "reserved_name_case",
        "time_of_day",
        "unnamed_column",
    ],
)
def test_bad_export_fails_once_and_keeps_the_previous_version(
    own_sales_instance: DagsterInstance, own_sales_dataset: SampleDataset, tmp_path: Path, break_export, message: str
) -> None:
    job = defs.resolve_job_def(SALES_JOB_NAME)
    assert job.execute_in_process(instance=own_sales_instance).success
    lake = Lake(str(tmp_path / "lake"))
    version_before = DeltaTable(lake.table_uri(tables.SALES)).version()
    rows_before = lake.read(tables.SALES).sort_by("image_id")

    export = Path(own_sales_dataset.sales_uri) / "sales.parquet"
    if break_export is None:
        export.write_bytes(b"PAR1 this is not parquet")
    else:
        pq.write_table(break_export(pq.read_table(export)), export)
    result = job.execute_in_process(instance=own_sales_instance, raise_on_error=False)

    assert not result.success
    (failure,) = [event for event in result.all_events if event.event_type == DagsterEventType.STEP_FAILURE]
    assert message in failure.step_failure_data.error.message
    assert str(export) in failure.step_failure_data.error.message  # names the file
    retried = {DagsterEventType.STEP_UP_FOR_RETRY, DagsterEventType.STEP_RESTARTED}
    assert not [event for event in result.all_events if event.event_type in retried]
    assert DeltaTable(lake.table_uri(tables.SALES)).version() == version_before
    assert lake.read(tables.SALES).sort_by("image_id").equals(rows_before)
