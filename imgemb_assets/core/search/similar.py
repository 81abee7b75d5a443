"""Similar-image search for people: by an image_id already in the lake, or by a new photo.

The Python API behind `imgemb similar`, for notebooks:

    from imgemb_assets.core.lake.lake import Lake
    from imgemb_assets.core.search.similar import similar_to_id, similar_to_photo

    lake = Lake("s3://bucket/lake", storage_options=...)
    similar_to_id(lake, "img_0001", k=10)
    similar_to_photo(lake, open("new.jpg", "rb").read(), weights="DEFAULT", sales_weight=0.3)

Both answer from the search index that the `refresh_search_index` job keeps
under the lake root, one per model_id (`core/search/index/`): a query is only
ever compared with vectors of the model that made it.

Ranking: with `sales_weight` w > 0 ("similar best-sellers"), the max(5k, 50)
most similar images are the candidates, each scored

    score = (1 - w) * similarity + w * (percentile rank of its sales among the candidates)

(an image with no sales row, or a null `sales`, counts as 0 sales), and the k
best scores are returned. With w = 0 the score is the similarity and the order
is the index's.

torch is imported by `similar_to_photo` only: a lookup by id needs no model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgemb_assets.core.embedding.model_settings import (
    PRECISIONS,
    EmbeddingSettings,
    ModelConfigError,
    ResolvedWeights,
    resolve_weights,
)
from imgemb_assets.core.imaging.images import ImageLimits, ImageRejected, downscale, refuse_oversized_file
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index.errors import IndexMissing, SearchIndexError, UnknownImageId
from imgemb_assets.core.search.index.persistence import load_index
from imgemb_assets.core.search.index.search_index import Neighbour, SearchIndex
from imgemb_assets.core.search.index.stored import stored_model_ids

# Candidates re-ranked when sales count: enough that a best-seller a little less
# similar than the k most similar can still rise into the k returned.
CANDIDATE_FACTOR: Final = 5
MIN_CANDIDATES: Final = 50
REFRESH_JOB: Final = "refresh_search_index"


class SimilarError(Exception):
    """A similar-image query that cannot be answered; the message says what to do about it."""


@dataclass(frozen=True)
class SimilarImage:
    image_id: str
    prefix: str
    similarity: float  # cosine similarity to the query, 1.0 for the same direction
    score: float  # what the result is ordered by; equals `similarity` when sales_weight is 0
    sales: dict[str, Any] = field(default_factory=dict)  # the sales table's row (image_id left out); {} when none


class SimilarImages(list[SimilarImage]):
    """A query's answer, best first, and the model whose index gave it (the CLI names it)."""

    def __init__(self, model_id: str, images: list[SimilarImage]) -> None:
        super().__init__(images)
        self.model_id = model_id


# --- by image_id ------------------------------------------------------------------


def similar_to_id(
    lake: Lake, image_id: str, k: int = 10, prefix: str | None = None, sales_weight: float = 0.0
) -> SimilarImages:
    """The k images most like `image_id` (itself excluded), from the index of the model that embedded it.

    An image_id in several prefixes needs `prefix`. Raises SimilarError.
    """
    _check_query_settings(k, sales_weight)
    found_prefix, model_id = _embedded_row_of(lake, image_id, prefix)
    index = _load_index_or_explain(lake, model_id)
    try:
        neighbours = index.neighbours_of(image_id, candidate_count(k), prefix=found_prefix)
    except UnknownImageId as exc:
        # In the table but not in the index: the partition was embedded after the last refresh.
        raise SimilarError(
            f"image_id {image_id!r} (prefix {found_prefix!r}) is in {tables.IMAGE_EMBEDDINGS} but not yet in the "
            f"search index of {model_id!r}: run the {REFRESH_JOB} job"
        ) from exc
    except SearchIndexError as exc:
        raise SimilarError(str(exc)) from exc
    return SimilarImages(model_id, rank_with_sales(neighbours, sales_of(lake, _ids(neighbours)), k, sales_weight))


def _embedded_row_of(lake: Lake, image_id: str, prefix: str | None) -> tuple[str, str]:
    """(prefix, model_id) of the image's row in image_embeddings; SimilarError when there is not exactly one."""
    # Only three short columns of the table, never the vectors, are scanned.
    try:
        batches = lake.read_batches(tables.IMAGE_EMBEDDINGS, columns=["image_id", tables.PARTITION_COLUMN, "model_id"])
    except LakeError as exc:
        raise SimilarError(f"{exc} (imgemb backfill-missing)") from exc
    rows: list[dict[str, Any]] = []
    for batch in batches:
        rows.extend(batch.filter(pc.equal(batch.column("image_id"), image_id)).to_pylist())
    where = {row[tables.PARTITION_COLUMN]: row["model_id"] for row in rows}
    if not where:
        raise SimilarError(
            f"image_id {image_id!r} is in no partition of {tables.IMAGE_EMBEDDINGS} under {lake.root_uri}"
        )
    if prefix is not None:
        if prefix not in where:
            raise SimilarError(
                f"image_id {image_id!r} is not in prefix {prefix!r} of {tables.IMAGE_EMBEDDINGS}; "
                f"it is in {sorted(where)}"
            )
        return prefix, where[prefix]
    if len(where) > 1:
        raise SimilarError(f"image_id {image_id!r} is in several prefixes {sorted(where)}: say which with a prefix")
    ((only_prefix, model_id),) = where.items()
    return only_prefix, model_id


# --- by a new photo ---------------------------------------------------------------


def similar_to_photo(
    lake: Lake,
    photo: bytes,
    weights: str,
    k: int = 10,
    sales_weight: float = 0.0,
    device: str = "auto",
    model: str = "resnet50",
) -> SimilarImages:
    """The k indexed images most like a photo, embedded here as the pipeline would have embedded it.

    The photo becomes a 224x224 thumbnail by the pipeline's own `downscale`, and
    is embedded by `weights` (`EmbeddingSettings.weights`) with the pipeline's
    preprocessing; the model's id must have an index under the lake. Raises SimilarError.
    """
    _check_query_settings(k, sales_weight)
    thumbnail = thumbnail_of_photo(photo)
    settings, resolved = settings_matching_an_index(lake, weights, device, model)
    from imgemb_assets.core.embedding.inference import embed_thumbnails  # torch: only here
    from imgemb_assets.core.embedding.models import load_model, model_id_for

    # The index before the model: a refusal (no vectors, unreadable) costs no model load.
    index = _load_index_or_explain(lake, model_id_for(settings, resolved))
    try:
        embedding_model = load_model(settings, resolved)
    except ModelConfigError as exc:
        raise SimilarError(f"the model cannot be loaded: {exc}") from exc
    vector = embed_thumbnails(embedding_model, [thumbnail])[0]
    try:
        (neighbours,) = index.search(vector[None, :], candidate_count(k), model_id=embedding_model.model_id)
    except SearchIndexError as exc:
        raise SimilarError(str(exc)) from exc
    ranked = rank_with_sales(neighbours, sales_of(lake, _ids(neighbours)), k, sales_weight)
    return SimilarImages(embedding_model.model_id, ranked)


def thumbnail_of_photo(photo: bytes, limits: ImageLimits = ImageLimits()) -> bytes:
    """The JPEG thumbnail the pipeline would store for this photo (same checks, same `downscale`)."""
    try:
        refuse_oversized_file(len(photo), limits)
        return downscale(photo, limits.max_pixels, full_size_jpeg_decode=limits.full_size_jpeg_decode).jpeg
    except ImageRejected as exc:
        raise SimilarError(f"the query image cannot be used: {exc.reason}") from exc


def settings_matching_an_index(
    lake: Lake, weights: str, device: str = "auto", model: str = "resnet50"
) -> tuple[EmbeddingSettings, ResolvedWeights]:
    """Settings for these weights whose model_id has an index under the lake, and the weights resolved (a
    state-dict file hashed once, whatever the precisions tried); SimilarError naming the indexes that exist.

    The precision is part of the model_id (`numerics_tag`): an index built with
    fp32 vectors on CPU is queried with fp32 on a GPU too (its `auto` would be
    fp16, another model_id), rather than refused.
    """
    from imgemb_assets.core.embedding.models import model_id_for  # torch: only for a photo

    stored = stored_model_ids(lake)
    if not stored:
        raise SimilarError(f"no search index under {lake.root_uri}: run the {REFRESH_JOB} job")
    tried: list[str] = []
    resolved: ResolvedWeights | None = None
    for precision in PRECISIONS:  # "auto" first: the model's usual arithmetic on this device
        try:
            settings = EmbeddingSettings(weights=weights, device=device, model=model, precision=precision)
            resolved = resolved or resolve_weights(weights)
            model_id = model_id_for(settings, resolved)
        except ModelConfigError as exc:
            if precision == "auto":
                raise SimilarError(f"the model settings are invalid: {exc}") from exc
            continue  # a precision this device has not (fp16 on CPU)
        if model_id in stored:
            return settings, resolved
        tried.append(model_id)
    raise SimilarError(
        f"no search index for {model} with weights {weights!r} (model_id {tried[0]!r}) under {lake.root_uri}; "
        f"indexes exist for {stored}: query with the weights those were embedded with, or embed the images with "
        f"these weights and run the {REFRESH_JOB} job"
    )


# --- ranking ----------------------------------------------------------------------


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


# --- shared -----------------------------------------------------------------------


def _check_query_settings(k: int, sales_weight: float) -> None:
    if k < 1:
        raise SimilarError(f"k must be at least 1, got {k}")
    if not 0.0 <= sales_weight <= 1.0:  # also refuses NaN
        raise SimilarError(f"sales_weight must be between 0 and 1, got {sales_weight}")


def _load_index_or_explain(lake: Lake, model_id: str) -> SearchIndex:
    try:
        index = load_index(lake, model_id)
    except IndexMissing as exc:
        raise SimilarError(
            f"no search index for model {model_id!r} under {lake.root_uri}: run the {REFRESH_JOB} job"
        ) from exc
    except SearchIndexError as exc:
        raise SimilarError(
            f"the search index of {model_id!r} cannot be read: {exc}; run the {REFRESH_JOB} job"
        ) from exc
    if len(index) == 0:
        # A refresh keeps the index of a model whose every partition was embedded again with other
        # weights, with no vectors: searched, it would answer "0 images" as if none were similar.
        raise SimilarError(
            f"nothing is indexed for model {model_id!r} under {lake.root_uri}: its search index holds no vectors "
            f"(no partition of {tables.IMAGE_EMBEDDINGS} held vectors of this model when the {REFRESH_JOB} job "
            f"last ran); embed images with this model's weights, then run the {REFRESH_JOB} job"
        )
    return index


def _ids(neighbours: Sequence[Neighbour]) -> list[str]:
    return [n.image_id for n in neighbours]


__all__ = [
    "SimilarError",
    "SimilarImage",
    "SimilarImages",
    "candidate_count",
    "rank_with_sales",
    "sales_of",
    "sales_percentile_ranks",
    "settings_matching_an_index",
    "similar_to_id",
    "similar_to_photo",
    "thumbnail_of_photo",
]
