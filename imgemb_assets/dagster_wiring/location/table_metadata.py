"""The metadata every table's materialization carries: rows, where the table is, and its columns."""

from typing import Any

import dagster as dg
import pyarrow as pa

from imgemb_assets.core.lake.lake import Lake


def table_metadata(lake: Lake, name: str, rows: int, schema: pa.Schema, **extra: Any) -> dict[str, Any]:
    """Row count, where the table is, and its columns as the UI's asset page shows them."""
    return {
        "dagster/row_count": rows,
        "dagster/column_schema": column_schema_of(schema),
        "table_uri": dg.MetadataValue.path(lake.table_uri(name)),
        **extra,
    }


def column_schema_of(schema: pa.Schema) -> dg.TableSchema:
    """The Arrow schema as Dagster's column schema: each column's Arrow type, and whether it may be null."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(field.name, str(field.type), constraints=dg.TableColumnConstraints(nullable=field.nullable))
            for field in schema
        ]
    )
