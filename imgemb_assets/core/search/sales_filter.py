"""`--where` for similar-image queries: which images an answer may hold, by the sales columns of images_with_sales.

What is accepted: ONE SQL boolean expression in polars' SQL dialect (`pl.sql_expr`),
evaluated row by row over `images_with_sales`, on its columns `image_id`, `prefix`
and the sales export's columns (`sales`, and whatever else the export has, e.g.
`category`, `price`): comparisons (`= <> != < <= > >=`), `AND`, `OR`, `NOT`,
`IN (...)` with a list of values, `LIKE` / `ILIKE`, `BETWEEN`, `IS [NOT] NULL`,
arithmetic, `CAST`, `CASE`, and scalar functions (`lower`, `upper`, `coalesce`,
`abs`, `round`, `length`, ...). Strings in single quotes; a column whose name has
spaces or capitals in double quotes. As in SQL's WHERE, a row where the
expression is NULL (`price < 50` with no price) does not match.

Refused, each in one line that names the problem and lists the columns: text
that is not one expression (empty, a statement, two expressions, a syntax
error), a column images_with_sales does not have, an expression naming no
column, an expression that is not boolean or does not fit the columns' types
(`category > 3`), and anything that looks beyond its own row: aggregates
(`avg(price)`, `count(*)`), window functions (`rank() OVER ...`, `lag`) and
subqueries (`EXISTS (SELECT ...)`, `IN (SELECT ...)`). Which constructs an
expression uses is read from the expression polars built (its serialized tree),
against a list of the ones that stay within a row: a construct not on the list
is refused rather than guessed at.

The filter reads only `image_id`, `prefix` and the columns it names (never the
thumbnails), all rows at once, and answers with the (prefix, image_id) pairs
that match; the query then searches those images only (`core/search/similar.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import polars as pl
import pyarrow as pa

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake, LakeError

FILTER_TABLE: Final = tables.IMAGES_WITH_SALES
EXAMPLE: Final = "price < 50 AND category = 'shoes'"

# Nodes of polars' expression tree that look at one row only (a Function node is checked further).
_ROW_WISE_NODES: Final = frozenset({"Column", "Literal", "BinaryExpr", "Cast", "Ternary", "Function"})
# Functions that look at other rows, by the name polars gives them (the first name of the node's
# `function`); polars' SQL produces these for aggregates and window functions.
_FUNCTIONS_BEYOND_ROW: Final = frozenset(
    {
        "Quantile", "Correlation", "NUnique", "Implode", "Rank", "Shift", "Range", "Unique", "DropNulls",
        "CumCount", "CumSum", "CumProd", "CumMin", "CumMax", "Diff", "Reverse", "Mode", "ValueCounts",
        "UniqueCounts", "ArgUnique", "Interpolate", "FillNullWithStrategy", "ForwardFill", "BackwardFill",
        "PctChange", "Repeat", "Hist", "Entropy", "RollingExpr", "RollingExprBy",
    }
)  # fmt: skip
# Boolean functions that look at other rows (the others, IsNull, Not, ..., stay in their row).
_BOOLEANS_BEYOND_ROW: Final = frozenset({"Any", "All", "IsUnique", "IsDuplicated", "IsFirstDistinct", "IsLastDistinct"})
_AGGREGATE: Final = "an aggregate function"
_WINDOW: Final = "a window function"
_SUBQUERY: Final = "a subquery"
_WHAT_IT_IS: Final = {
    "Agg": _AGGREGATE,
    "Len": f"{_AGGREGATE} (count)",
    "Quantile": _AGGREGATE,
    "Correlation": _AGGREGATE,
    "NUnique": _AGGREGATE,
    "Implode": _AGGREGATE,
    "Any": _AGGREGATE,
    "All": _AGGREGATE,
    "Over": _WINDOW,
    "Rank": _WINDOW,
    "Shift": _WINDOW,
    "Range": _WINDOW,
    "SubPlan": _SUBQUERY,
}


class SalesFilterError(Exception):
    """A filter that cannot be used, or that cannot be evaluated; the message is one line saying why."""


@dataclass(frozen=True)
class SalesFilter:
    """A checked filter: its text, the polars expression, and the columns of images_with_sales it reads."""

    text: str
    expression: pl.Expr
    columns: tuple[str, ...]


@dataclass(frozen=True)
class FilterMatches:
    """The images of images_with_sales a filter lets through."""

    by_prefix: dict[str, frozenset[str]]  # prefix -> matching image_ids
    rows: int  # rows of images_with_sales evaluated

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.by_prefix.values())


def filterable_columns(schema: pa.Schema) -> list[str]:
    """The columns a filter may name: image_id, prefix, then the sales columns of an images_with_sales schema."""
    sales = [name for name in tables.sales_schema_of_joined(schema).names if name != "image_id"]
    return ["image_id", tables.PARTITION_COLUMN, *sales]


def parse_sales_filter(text: str, schema: pa.Schema) -> SalesFilter:
    """`text` checked against an images_with_sales `schema` (see the module docstring); SalesFilterError if refused."""
    columns = filterable_columns(schema)

    def refused(problem: str) -> SalesFilterError:
        return SalesFilterError(
            f"cannot filter by {text!r}: {problem}; write one SQL boolean expression over the columns of "
            f'{FILTER_TABLE} ({", ".join(columns)}), e.g. "{EXAMPLE}"'
        )

    if not text.strip():
        raise refused("it is empty")
    try:
        expression = pl.sql_expr(text)
    except pl.exceptions.PolarsError as exc:
        message = _first_line(exc)
        if "relation" in message and "not found" in message:  # a table named: the text holds a SELECT
            raise refused("subqueries are not accepted") from exc
        raise refused(f"it is not one SQL expression ({message})") from exc
    beyond_row = _first_construct_beyond_row(json.loads(expression.meta.serialize(format="json")))
    if beyond_row == _SUBQUERY:
        raise refused("subqueries are not accepted")
    if beyond_row is not None:
        raise refused(f"it uses {beyond_row}, but a filter is evaluated row by row")
    named = list(dict.fromkeys(expression.meta.root_names()))
    if not named:
        raise refused("it names no column")
    unknown = [name for name in named if name not in columns]
    if unknown:
        raise refused(f"{FILTER_TABLE} has no sales column {', '.join(repr(name) for name in unknown)}")
    empty = pl.from_arrow(schema.empty_table().select(named))
    assert isinstance(empty, pl.DataFrame)
    try:
        produced = empty.lazy().select(expression.alias("matches")).collect_schema()["matches"]
        if produced != pl.Boolean:
            raise refused(f"it is not a boolean expression (it gives {produced} values)")
        empty.filter(expression)  # type errors (`category > 3`) show on evaluation, even of no rows
    except pl.exceptions.PolarsError as exc:
        raise refused(f"it does not fit the columns' types ({_first_line(exc)})") from exc
    return SalesFilter(text, expression, tuple(named))


def sales_filter_for(lake: Lake, text: str) -> SalesFilter:
    """`text` checked against the lake's images_with_sales (its schema only is read); SalesFilterError if refused."""
    try:
        schema = lake.schema(FILTER_TABLE)
    except LakeError as exc:
        raise SalesFilterError(f"cannot filter by {text!r}: the filter reads {FILTER_TABLE}: {exc}") from exc
    return parse_sales_filter(text, schema)


def matching_images(lake: Lake, sales_filter: SalesFilter) -> FilterMatches:
    """The (prefix, image_id) of every row of images_with_sales the filter lets through."""
    wanted = list(dict.fromkeys(["image_id", tables.PARTITION_COLUMN, *sales_filter.columns]))
    try:
        rows = lake.read(FILTER_TABLE, columns=wanted)
    except LakeError as exc:
        raise SalesFilterError(f"cannot filter by {sales_filter.text!r}: {exc}") from exc
    frame = pl.from_arrow(rows)
    assert isinstance(frame, pl.DataFrame)
    try:
        matched = frame.filter(sales_filter.expression).select("image_id", tables.PARTITION_COLUMN)
    except pl.exceptions.PolarsError as exc:  # a value the expression cannot take (CAST('x' AS INT))
        raise SalesFilterError(
            f"cannot filter by {sales_filter.text!r}: evaluating it over {FILTER_TABLE} failed ({_first_line(exc)})"
        ) from exc
    by_prefix: dict[str, set[str]] = {}
    for image_id, prefix in matched.iter_rows():
        by_prefix.setdefault(prefix, set()).add(image_id)
    return FilterMatches({prefix: frozenset(ids) for prefix, ids in by_prefix.items()}, frame.height)


def _first_construct_beyond_row(node: Any) -> str | None:
    """What in a serialized polars expression looks at rows other than its own, in words; None if nothing does."""
    for kind, payload in _nodes(node):
        if kind not in _ROW_WISE_NODES:
            return _WHAT_IT_IS.get(kind, f"{kind!r}, which is not accepted")
        if kind == "Function":
            names = _function_names(payload.get("function"))
            if names[0] in _FUNCTIONS_BEYOND_ROW or (
                names[0] == "Boolean" and names[1:2] and names[1] in _BOOLEANS_BEYOND_ROW
            ):
                name = names[1] if names[0] == "Boolean" else names[0]
                return _WHAT_IT_IS.get(name, f"{_WINDOW} ({name})")
    return None


def _nodes(node: Any) -> Iterator[tuple[str, Any]]:
    """Every expression node of a serialized tree, as (kind, payload), parents first."""
    if isinstance(node, str):  # a node with no payload, such as "Len"
        yield node, None
        return
    if not isinstance(node, Mapping) or len(node) != 1:
        yield repr(node)[:40], None
        return
    ((kind, payload),) = node.items()
    yield kind, payload
    children: list[Any] = []
    if kind == "BinaryExpr":
        children = [payload["left"], payload["right"]]
    elif kind == "Cast":
        children = [payload["expr"]]
    elif kind == "Ternary":
        children = [payload["predicate"], payload["truthy"], payload["falsy"]]
    elif kind == "Function":
        children = list(payload["input"])
    for child in children:
        yield from _nodes(child)


def _function_names(function: Any) -> list[str]:
    """A Function node's names, outermost first: `{"StringExpr": "Lowercase"}` -> ["StringExpr", "Lowercase"]."""
    names: list[str] = []
    while True:
        if isinstance(function, str):
            return [*names, function]
        if not isinstance(function, Mapping) or not function:
            return names or ["?"]
        name, function = next(iter(function.items()))
        names.append(str(name))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


__all__ = [
    "FILTER_TABLE",
    "FilterMatches",
    "SalesFilter",
    "SalesFilterError",
    "filterable_columns",
    "matching_images",
    "parse_sales_filter",
    "sales_filter_for",
]
