"""`where` for similar-image queries: which expressions are accepted and refused (one line each), the exact
search among allowed vectors, and queries by id and by vector on real Delta tables (local and S3) whose
answers are known from how their vectors were made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index.persistence import load_index
from imgemb_assets.core.search.index.search_index import SearchIndex
from imgemb_assets.core.search.sales_filter import SalesFilterError, matching_images, parse_sales_filter
from imgemb_assets.core.search.similar import SimilarError, similar_to_id, similar_to_vector
from imgemb_support.rows import CATALOGUE_SALES_SCHEMA, downscaled_rows, write_catalogue, write_fan_catalogue

JOINED = tables.images_with_sales_schema(CATALOGUE_SALES_SCHEMA)
COLUMNS = "image_id, prefix, sales, category, price"
MODEL = "test/model-a"
WIDTH = 16


# --- which expressions are accepted -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "columns"),
    [
        ("price < 50 AND category = 'shoes'", ("price", "category")),
        ("category IN ('shoes', 'bags')", ("category",)),
        ("category NOT IN ('hats')", ("category",)),
        ("category LIKE 'sh%' OR category ILIKE 'BA%'", ("category",)),
        ("price BETWEEN 10 AND 20", ("price",)),
        ("price IS NULL", ("price",)),
        ("NOT (sales > 100) AND prefix = 'p2'", ("sales", "prefix")),
        ("lower(category) = 'shoes' AND coalesce(price, 0) < 30", ("category", "price")),
        ("CASE WHEN price IS NULL THEN sales > 0 ELSE price * 2 < sales END", ("price", "sales")),
        ("image_id LIKE 'img_1%'", ("image_id",)),
    ],
)
def test_one_sql_boolean_expression_over_the_sales_columns_is_accepted(text: str, columns: tuple[str, ...]) -> None:
    assert set(parse_sales_filter(text, JOINED).columns) == set(columns)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "it is empty"),
        ("price <", "it is not one SQL expression (unable to parse"),
        ("SELECT image_id FROM images_with_sales", "it is not one SQL expression (expected an expression"),
        ("price < 50; DROP TABLE sales", "it is not one SQL expression (invalid expression"),
        ("price < 50, sales > 1", "it is not one SQL expression"),
        ("price IN (SELECT price FROM sales)", "subqueries are not accepted"),
        ("EXISTS (SELECT 1)", "subqueries are not accepted"),
        ("price > avg(price)", "it uses an aggregate function, but a filter is evaluated row by row"),
        ("count(*) > 3", "it uses an aggregate function (count)"),
        ("count(DISTINCT category) > 1", "it uses an aggregate function"),
        ("quantile_cont(price, 0.5) < price", "it uses an aggregate function"),
        ("rank() OVER (ORDER BY sales) <= 3", "it uses a window function"),
        ("row_number() OVER () < 3", "it uses a window function"),
        ("price > lag(price) OVER (ORDER BY sales)", "it uses a window function"),
        ("TRUE", "it names no column"),
        ("colour = 'red'", "images_with_sales has no sales column 'colour'"),
        ("width > 100", "images_with_sales has no sales column 'width'"),  # an image column, not a sales one
        ("Price < 3", "images_with_sales has no sales column 'Price'"),
        ("price * 2", "it is not a boolean expression (it gives Float64 values)"),
        ("category", "it is not a boolean expression (it gives String values)"),
        ("category > 3", "it does not fit the columns' types (cannot compare string with numeric type"),
    ],
)
def test_anything_else_is_refused_in_one_line_naming_the_problem_and_the_columns(text: str, problem: str) -> None:
    with pytest.raises(SalesFilterError) as refused:
        parse_sales_filter(text, JOINED)
    message = str(refused.value)
    assert message.startswith(f"cannot filter by {text!r}: {problem}"), message
    assert f"over the columns of images_with_sales ({COLUMNS})" in message and "\n" not in message


def test_a_value_the_expression_cannot_take_is_refused_when_evaluated(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    write_catalogue(lake, "p1", [("a", "shoes", 1.0)], np.ones((1, WIDTH), np.float32), MODEL)
    with pytest.raises(SalesFilterError, match=r"^cannot filter by .*evaluating it over images_with_sales failed \("):
        matching_images(lake, parse_sales_filter("CAST(category AS INT) = 1", JOINED))


# --- exact search among allowed vectors ---------------------------------------------------------


@pytest.mark.parametrize("ann_threshold", [10_000, 100], ids=["exact", "hnsw"])
def test_search_among_gives_the_true_nearest_of_the_allowed_images(ann_threshold: int) -> None:
    from imgemb_assets.core.search.index.partitions import PartitionVectors

    rng = np.random.default_rng(0)
    prefixes = {p: rng.normal(size=(150, WIDTH)).astype(np.float32) for p in ("p1", "p2")}
    ids = [f"img_{i:03d}" for i in range(150)]
    index = SearchIndex.build(
        MODEL, WIDTH, [PartitionVectors(p, p, ids, v) for p, v in prefixes.items()], ann_threshold=ann_threshold
    )
    assert index.uses_ann == (ann_threshold == 100)
    allowed = {"p1": set(ids[::7]) | {"not_indexed"}, "p2": set(ids[3::11]), "p9": {"img_000"}}
    query = rng.normal(size=WIDTH).astype(np.float32)

    (found,) = index.search_among(query, allowed, k=8)

    unit = {p: v / np.linalg.norm(v, axis=1, keepdims=True) for p, v in prefixes.items()}
    truth = sorted(
        ((float(unit[p][ids.index(i)] @ (query / np.linalg.norm(query))), p, i) for p in ("p1", "p2") for i in allowed[p] if i in ids),
        reverse=True,
    )[:8]  # fmt: skip
    assert [(n.prefix, n.image_id) for n in found] == [(p, i) for _, p, i in truth]
    assert [n.similarity for n in found] == pytest.approx([s for s, _, _ in truth], abs=1e-5)
    assert index.count_among(allowed) == len(ids[::7]) + len(ids[3::11])
    # Everything allowed is the exact search; nothing allowed, nothing found.
    everything = {p: set(ids) for p in prefixes}
    assert index.search_among(query, everything, k=5) == index.exact_search(query, k=5)
    assert index.search_among(query, {}, k=5) == [[]]


# --- queries on a catalogue (`write_fan_catalogue`: hats nearest the query image q, then shoes) ---


def test_a_filter_narrows_the_answer_and_still_gives_k_images(any_lake: Lake) -> None:
    vectors = write_fan_catalogue(any_lake, MODEL, WIDTH)
    assert [i.image_id for i in similar_to_id(any_lake, "q", k=3)] == ["img_01", "img_02", "img_03"]

    # None of the 60 unfiltered candidates' first eight is a shoe: the three nearest shoes all the same.
    shoes = similar_to_id(any_lake, "q", k=3, where="category = 'shoes'")
    assert [(i.prefix, i.image_id) for i in shoes] == [("p1", "img_09"), ("p2", "img_10"), ("p1", "img_11")]
    assert [i.sales["category"] for i in shoes] == ["shoes"] * 3 and shoes.model_id == MODEL
    assert shoes[0].similarity == pytest.approx(np.cos(0.45), abs=1e-6)
    assert (shoes.where, shoes.matching) == ("category = 'shoes'", 12)

    # Fewer matches than k: every one of them, nearest first; a null price does not match.
    cheap = similar_to_id(any_lake, "q", k=10, where="category = 'shoes' AND price BETWEEN 55 AND 70")
    assert [i.image_id for i in cheap] == ["img_11", "img_13", "img_14"] and cheap.matching == 3
    assert [i.image_id for i in similar_to_id(any_lake, "q", k=2, where="price IS NULL")] == ["img_12"]
    # In p2, img_02, img_04, ... have sales 0, 10, ...: img_08 has 30, img_10 40.
    assert [i.image_id for i in similar_to_id(any_lake, "q", k=2, where="prefix = 'p2' AND sales > 30")] == [
        "img_10",
        "img_12",
    ]

    # A query vector goes the same way (a text tower's would): the query image itself now counts, as a hat.
    by_vector = similar_to_vector(any_lake, vectors["q"] * 3.0, MODEL, k=2, where="category IN ('hats')")
    assert [i.image_id for i in by_vector] == ["q", "img_01"] and by_vector.matching == 9
    # Similar best-sellers among the matching only: the best-selling shoes of p1 outrank nearer ones.
    best = similar_to_id(any_lake, "q", k=2, where="category = 'shoes' AND prefix = 'p1'", sales_weight=1.0)
    assert [i.image_id for i in best] == ["img_19", "img_17"]


def test_a_filter_that_leaves_nothing_to_answer_says_why(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    vectors = write_fan_catalogue(lake, MODEL, WIDTH)
    with pytest.raises(
        SimilarError, match=r"^no image matches \"category = 'boots'\": none of the 21 rows of images_with_sales under "
    ):
        similar_to_id(lake, "q", where="category = 'boots'")
    with pytest.raises(
        SimilarError,
        match=r"^no image but the query itself matches \"image_id = 'q'\" in the search index of 'test/model-a'$",
    ):
        similar_to_id(lake, "q", where="image_id = 'q'")
    # Images joined with sales but not embedded yet (or not refreshed): in the table, not in the index.
    joined = downscaled_rows("p3", ["new_1", "new_2"]).drop_columns(["decoded_with"])
    extra = pa.table({"sales": [1.0, 2.0], "category": ["boots"] * 2, "price": [1.0, 2.0]})
    lake.write_partition(
        tables.IMAGES_WITH_SALES, pa.Table.from_arrays([*joined.columns, *extra.columns], schema=JOINED), "p3"
    )
    with pytest.raises(
        SimilarError,
        match=r"^2 images of images_with_sales match \"category = 'boots'\", but none of them is in the search index of 'test/model-a': embed their prefixes with this model, then run the refresh_search_index job$",
    ):
        similar_to_vector(lake, vectors["q"], MODEL, where="category = 'boots'")
    assert load_index(lake, MODEL).count_among({"p3": {"new_1"}}) == 0


def test_a_bad_filter_is_refused_before_anything_is_searched(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    with pytest.raises(
        SimilarError,
        match=r"^cannot filter by 'price < 1': the filter reads images_with_sales: .*materialize images_with_sales first$",
    ):
        similar_to_id(lake, "q", where="price < 1")
    write_fan_catalogue(lake, MODEL, WIDTH)
    with pytest.raises(SimilarError, match=r"^cannot filter by 'avg\(price\) > 1': it uses an aggregate function"):
        similar_to_id(lake, "no_such_image", where="avg(price) > 1")  # the filter first: no lookup of the id
    with pytest.raises(
        SimilarError, match=r"^no search index for model 'other/model' under .*run the refresh_search_index job$"
    ):
        similar_to_vector(lake, np.ones(WIDTH, np.float32), "other/model", where="price < 1")
    with pytest.raises(
        SimilarError, match=r"^queries of shape \(1, 3\) asked of an index of 'test/model-a' vectors of width 16$"
    ):
        similar_to_vector(lake, np.ones(3, np.float32), MODEL, where="price < 100")
