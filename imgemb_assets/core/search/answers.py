"""What a similar-image query answers: the images with their similarity and score, and the ranking that weighs
similarity against sales ("similar best-sellers"; the formula is in `similar`'s docstring)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index.search_index import Neighbour


@dataclass(frozen=True)
class SimilarImage:
    image_id: str
    prefix: str
    similarity: float  # cosine similarity to the query, 1.0 for the same direction
    score: float  # what the result is ordered by; equals `similarity` when sales_weight is 0
    sales: dict[str, Any] = field(default_factory=dict)  # the sales table's row (image_id left out); {} when none


class SimilarImages(list[SimilarImage]):
    """A query's answer, best first, and the model whose index gave it (the CLI names it).

    With a filter, `where` is its text and `matching` how many indexed images of the model
    it let through, the query image left out: fewer than k means every one of them is here.
    """

    def __init__(
        self, model_id: str, images: list[SimilarImage], where: str | None = None, matching: int | None = None
    ) -> None:
        super().__init__(images)
        self.model_id = model_id
        self.where = where
        self.matching = matching


# Candidates re-ranked when sales count: enough that a best-seller a little less
# similar than the k most similar can still rise into the k returned.
CANDIDATE_FACTOR: Final = 5
MIN_CANDIDATES: Final = 50


def candidate_count(k: int) -> int:
    """How many of the most similar images are re-ranked to return k."""
    return max(CANDIDATE_FACTOR * k, MIN_CANDIDATES)


def rank_with_sales(
    neighbours: Sequence[Neighbour], sales: Mapping[str, Mapping[str, Any]], k: int, sales_weight: float
) -> list[SimilarImage]:
    """The k best candidates by (1 - w) * similarity + w * sales percentile rank among them (see the module docstring).

    `neighbours` come most similar first; equal scores keep that order.
    """
    ranks = sales_percentile_ranks([_sales_value(sales.get(n.image_id)) for n in neighbours])
    scored = [
        SimilarImage(
            image_id=n.image_id,
            prefix=n.prefix,
            similarity=n.similarity,
            score=n.similarity if sales_weight == 0 else (1 - sales_weight) * n.similarity + sales_weight * rank,
            sales=dict(sales.get(n.image_id, {})),
        )
        for n, rank in zip(neighbours, ranks)
    ]
    return sorted(scored, key=lambda image: -image.score)[:k]  # sorted is stable


def sales_percentile_ranks(values: Sequence[float]) -> list[float]:
    """Each value's rank among `values` on [0, 1]: 0 for the lowest, 1 for the highest, ties share their mean rank."""
    if not values:
        return []
    if len(values) == 1:
        return [1.0]
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array), dtype=np.float64)
    ranks[order] = np.arange(len(array), dtype=np.float64)
    for value in np.unique(array):  # ties: one rank for equal sales, whatever order they came in
        equal = array == value
        ranks[equal] = ranks[equal].mean()
    return (ranks / (len(array) - 1)).tolist()


def _sales_value(row: Mapping[str, Any] | None) -> float:
    # No sales row, or no figure in it, is no sales: such an image is no best-seller.
    value = None if row is None else row.get("sales")
    return float(value) if value is not None else 0.0


def sales_of(lake: Lake, image_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """image_id -> the sales table's row (without image_id) for those of `image_ids` it has; {} without a table."""
    if not image_ids:
        return {}
    try:
        table = lake.read(tables.SALES)
    except LakeError:
        return {}  # results are still similar images; they just have no sales to show or weigh
    wanted = table.filter(pc.is_in(table.column("image_id"), value_set=pa.array(list(set(image_ids)), pa.string())))
    return {row.pop("image_id"): row for row in wanted.to_pylist()}
