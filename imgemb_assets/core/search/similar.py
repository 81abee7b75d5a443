"""Similar-image search for people: by an image_id already in the lake, by a new photo, or by a text.

The Python API behind `imgemb similar`, for notebooks:

    from imgemb_assets.core.lake.lake import Lake
    from imgemb_assets.core.search.similar import similar_to_id, similar_to_photo, similar_to_text

    lake = Lake("s3://bucket/lake", storage_options=...)
    similar_to_id(lake, "img_0001", k=10)
    similar_to_photo(lake, open("new.jpg", "rb").read(), weights="DEFAULT", sales_weight=0.3)
    similar_to_id(lake, "img_0001", where="price < 50 AND category = 'shoes'")
    similar_to_text(lake, "red running shoes", weights="DEFAULT", model="clip_vit_b_32")

All answer from the search index that the `refresh_search_index` job keeps
under the lake root, one per model_id (`core/search/index.py`): a query is only
ever compared with vectors of the model that made it. Photos and texts go
through `similar_to_vector`, which answers any query vector of a model (an image
tower's, or a text tower's paired with it) from that model's index.

A text is encoded by the text tower of the CLIP whose weights are given
(`core/embedding/text_encoder.py`); the tower's model_id is the one its image
tower writes, so the text is answered from the index of exactly that model_id
and from no other: a text vector compared with image vectors of other weights
would be answered, and be nonsense. A model without a text tower, an unknown
model, an empty text, a bad filter, a lake without an index, a lake whose
indexes are all of models without a text tower, and a lake without the index
of the tower's model_id are each refused in one line before any model is loaded.

Filtering (`where="price < 50 AND category = 'shoes'"`, `imgemb similar --where`):
one SQL boolean expression over image_id, prefix and the sales columns of
`images_with_sales` (what is accepted: `core/search/sales_filter.py`). The filter
runs first, over those columns of the whole table, and gives the images an
answer may hold; the query is then searched exactly among the indexed vectors of
those images only (`SearchIndex.search_among`). So the answer is the true k
nearest among the images that match, k of them whenever k match, however few
match, and from the HNSW index too: asking the graph for more and more
neighbours until k pass the filter loses recall exactly when few images match,
and may end up reading every vector anyway. The cost is an exact search over the
matching vectors (about 0.75 ms per 1,000 per query here, so 73 ms when 100,000
match) plus one read of a few short columns of images_with_sales; the vectors are
in memory already (a loaded index holds them for exact search and lookups).
Sales ranking (below) then applies among the matching candidates. A query by
image_id need not match the filter itself; it is never in its own answer.

Ranking: with `sales_weight` w > 0 ("similar best-sellers"), the max(5k, 50)
most similar images are the candidates, each scored

    score = (1 - w) * similarity + w * (percentile rank of its sales among the candidates)

(an image with no sales row, or a null `sales`, counts as 0 sales), and the k
best scores are returned. With w = 0 the score is the similarity and the order
is the index's.

torch is imported by `similar_to_photo` and `similar_to_text` only: a lookup by id needs no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import pyarrow.compute as pc

from imgemb_assets.core.embedding.backbones.specs import BACKBONES, NoTextTower, has_text_tower, require_text_tower
from imgemb_assets.core.embedding.model_settings import (
    PRECISIONS,
    EmbeddingSettings,
    ModelConfigError,
    ResolvedWeights,
    backbone_of_model_id,
    resolve_weights,
)
from imgemb_assets.core.imaging.images import ImageLimits, ImageRejected, downscale, refuse_oversized_file
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake, LakeError
from imgemb_assets.core.search.answers import SimilarImage, SimilarImages, candidate_count, rank_with_sales, sales_of
from imgemb_assets.core.search.index.errors import IndexMissing, SearchIndexError, UnknownImageId
from imgemb_assets.core.search.index.persistence import load_index
from imgemb_assets.core.search.index.search_index import Neighbour, SearchIndex
from imgemb_assets.core.search.index.stored import stored_model_ids
from imgemb_assets.core.search.sales_filter import (
    FILTER_TABLE,
    SalesFilter,
    SalesFilterError,
    matching_images,
    sales_filter_for,
)

REFRESH_JOB: Final = "refresh_search_index"


class SimilarError(Exception):
    """A similar-image query that cannot be answered; the message says what to do about it."""


# --- by image_id ------------------------------------------------------------------


def similar_to_id(
    lake: Lake,
    image_id: str,
    k: int = 10,
    prefix: str | None = None,
    sales_weight: float = 0.0,
    where: str | SalesFilter | None = None,
) -> SimilarImages:
    """The k images most like `image_id` (itself excluded), from the index of the model that embedded it.

    An image_id in several prefixes needs `prefix`. With `where`, only images it lets
    through are answered (the module docstring). Raises SimilarError.
    """
    _check_query_settings(k, sales_weight)
    sales_filter = checked_filter(lake, where)
    found_prefix, model_id = _embedded_row_of(lake, image_id, prefix)
    index = load_index_for_query(lake, model_id)
    try:
        if sales_filter is None:
            return SimilarImages(
                model_id,
                _ranked(lake, index.neighbours_of(image_id, candidate_count(k), found_prefix), k, sales_weight),
            )
        vector = index.vector_of(image_id, found_prefix)
    except UnknownImageId as exc:
        # In the table but not in the index: the partition was embedded after the last refresh.
        raise SimilarError(
            f"image_id {image_id!r} (prefix {found_prefix!r}) is in {tables.IMAGE_EMBEDDINGS} but not yet in the "
            f"search index of {model_id!r}: run the {REFRESH_JOB} job"
        ) from exc
    except SearchIndexError as exc:
        raise SimilarError(str(exc)) from exc
    return _filtered_answer(lake, index, vector, k, sales_weight, sales_filter, itself=(found_prefix, image_id))


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
    where: str | SalesFilter | None = None,
) -> SimilarImages:
    """The k indexed images most like a photo, embedded here as the pipeline would have embedded it.

    The photo becomes a 224x224 thumbnail by the pipeline's own `downscale`, and
    is embedded by `weights` (`EmbeddingSettings.weights`) with the pipeline's
    preprocessing; the model's id must have an index under the lake. With `where`,
    only images it lets through are answered. Raises SimilarError.
    """
    _check_query_settings(k, sales_weight)
    sales_filter = checked_filter(lake, where)
    thumbnail = thumbnail_of_photo(photo)
    settings, resolved = settings_matching_an_index(lake, weights, device, model)
    from imgemb_assets.core.embedding.inference import embed_thumbnails  # torch: only here
    from imgemb_assets.core.embedding.models import load_model, model_id_for

    # The filter and the index before the model: a refusal (a bad filter, no vectors, unreadable) costs no model load.
    index = load_index_for_query(lake, model_id_for(settings, resolved))
    try:
        embedding_model = load_model(settings, resolved)
    except ModelConfigError as exc:
        raise SimilarError(f"the model cannot be loaded: {exc}") from exc
    vector = embed_thumbnails(embedding_model, [thumbnail])[0]
    return similar_to_vector(lake, vector, embedding_model.model_id, k, sales_weight, where=sales_filter, index=index)


# --- by a text ---------------------------------------------------------------------


def similar_to_text(
    lake: Lake,
    text: str,
    weights: str,
    k: int = 10,
    sales_weight: float = 0.0,
    device: str = "auto",
    model: str = "clip_vit_b_32",
    where: str | SalesFilter | None = None,
) -> SimilarImages:
    """The k indexed images that best match a text, encoded by the text tower paired with the index's model.

    `model` and `weights` (`EmbeddingSettings.weights`: a pretrained tag, a checkpoint
    file, `random[:<seed>]`, or a checkpoint folder for `open_clip_dir`) name one CLIP
    checkpoint; its text tower encodes the text, and the answer comes from the index of
    the model_id its image tower writes, which must be under the lake. With `where`,
    only images it lets through are answered. Raises SimilarError, in one line, before
    any model is loaded for everything a look at the lake can tell (see the module docstring).
    """
    _check_query_settings(k, sales_weight)
    if not text.strip():
        raise SimilarError("the text query is empty: say what to look for, e.g. 'red running shoes'")
    text_settings(weights, device, model)
    sales_filter = checked_filter(lake, where)
    stored = stored_model_ids(lake)
    refuse_indexes_without_text(lake, stored)
    settings, resolved = settings_matching_an_index(lake, weights, device, model, stored=stored)
    from imgemb_assets.core.embedding.models import model_id_for  # torch: only here
    from imgemb_assets.core.embedding.text_encoder import load_text_encoder

    index = load_index_for_query(lake, model_id_for(settings, resolved))
    try:
        encoder = load_text_encoder(settings, resolved)
    except ModelConfigError as exc:
        raise SimilarError(f"the text tower cannot be loaded: {exc}") from exc
    (vector,) = encoder.encode([text])
    return similar_to_vector(lake, vector, encoder.model_id, k, sales_weight, where=sales_filter, index=index)


def text_settings(weights: str, device: str = "auto", model: str = "clip_vit_b_32") -> EmbeddingSettings:
    """Settings of a model that can encode text, checked without torch; SimilarError in one line if not.

    An unknown model is refused as the settings refuse it; a known one without a text
    tower (a ResNet, a ViT trained on labels) is refused naming it and the CLIP models.
    """
    if model in BACKBONES:
        try:
            require_text_tower(model)
        except NoTextTower as exc:
            raise SimilarError(str(exc)) from exc
    try:
        return EmbeddingSettings(weights=weights, device=device, model=model)
    except ModelConfigError as exc:
        raise SimilarError(f"the model settings are invalid: {exc}") from exc


def refuse_indexes_without_text(lake: Lake, stored: Sequence[str]) -> None:
    """SimilarError when the lake has indexes and none is of a model with a text tower: no text can be answered.

    Whatever CLIP weights a text query names, its model_id is none of them; saying so
    names the models the lake was embedded with rather than only the weights to try.
    """
    if stored and not any(has_text_tower(backbone_of_model_id(model_id) or "") for model_id in stored):
        with_text = ", ".join(name for name in BACKBONES if has_text_tower(name))
        raise SimilarError(
            f"no search index under {lake.root_uri} can answer a text: indexes exist for {list(stored)}, of models "
            f"without a text tower; text needs a CLIP model ({with_text}): embed the images with one and run the "
            f"{REFRESH_JOB} job"
        )


# --- by a query vector (an image tower's, or a text tower's paired with it) ------------


def similar_to_vector(
    lake: Lake,
    vector: np.ndarray,
    model_id: str,
    k: int = 10,
    sales_weight: float = 0.0,
    where: str | SalesFilter | None = None,
    index: SearchIndex | None = None,
) -> SimilarImages:
    """The k indexed images most like a query `vector` of `model_id`, from that model's index.

    The one path every query takes once it is a vector: a photo's (`similar_to_photo`),
    or a text's, encoded by the text tower paired with `model_id`'s image tower. The
    vector's width must be the index's; it need not be normalised. `index`: the index of
    `model_id`, when the caller loaded it already (`load_index_for_query`, to refuse
    before loading a model). With `where`, only images it lets through are answered.
    Raises SimilarError.
    """
    _check_query_settings(k, sales_weight)
    sales_filter = checked_filter(lake, where)
    if index is None:
        index = load_index_for_query(lake, model_id)
    elif index.model_id != model_id:
        raise SimilarError(f"a query vector of model {model_id!r} was asked of the search index of {index.model_id!r}")
    query = np.asarray(vector)[None, :] if np.ndim(vector) == 1 else np.asarray(vector)
    if query.ndim != 2 or query.shape[0] != 1:
        raise SimilarError(f"one query vector at a time, got an array of shape {np.shape(vector)}")
    if sales_filter is not None:
        return _filtered_answer(lake, index, query, k, sales_weight, sales_filter)
    try:
        (neighbours,) = index.search(query, candidate_count(k), model_id=model_id)
    except SearchIndexError as exc:
        raise SimilarError(str(exc)) from exc
    return SimilarImages(model_id, _ranked(lake, neighbours, k, sales_weight))


def checked_filter(lake: Lake, where: str | SalesFilter | None) -> SalesFilter | None:
    """`where` checked against the lake's images_with_sales (its schema only is read); SimilarError if refused."""
    if where is None or isinstance(where, SalesFilter):
        return where
    try:
        return sales_filter_for(lake, where)
    except SalesFilterError as exc:
        raise SimilarError(str(exc)) from exc


def _filtered_answer(
    lake: Lake,
    index: SearchIndex,
    query: np.ndarray,
    k: int,
    sales_weight: float,
    sales_filter: SalesFilter,
    itself: tuple[str, str] | None = None,
) -> SimilarImages:
    """The answer among the images the filter lets through: exact search over their vectors only."""
    try:
        matches = matching_images(lake, sales_filter)
    except SalesFilterError as exc:
        raise SimilarError(str(exc)) from exc
    where = sales_filter.text
    if not matches.count:
        raise SimilarError(
            f"no image matches {where!r}: none of the {matches.rows} rows of {FILTER_TABLE} under {lake.root_uri}"
        )
    indexed = index.count_among(matches.by_prefix)
    if not indexed:
        raise SimilarError(
            f"{matches.count} images of {FILTER_TABLE} match {where!r}, but none of them is in the search index of "
            f"{index.model_id!r}: embed their prefixes with this model, then run the {REFRESH_JOB} job"
        )
    # A query by image_id is indexed (its vector came from the index): when it matches, it is no answer.
    query_matches = itself is not None and itself[1] in matches.by_prefix.get(itself[0], ())
    answerable = indexed - query_matches
    if not answerable:
        raise SimilarError(f"no image but the query itself matches {where!r} in the search index of {index.model_id!r}")
    try:
        (neighbours,) = index.search_among(
            query, matches.by_prefix, candidate_count(k) + query_matches, model_id=index.model_id
        )
    except SearchIndexError as exc:
        raise SimilarError(str(exc)) from exc
    neighbours = [n for n in neighbours if (n.prefix, n.image_id) != itself][: candidate_count(k)]
    return SimilarImages(index.model_id, _ranked(lake, neighbours, k, sales_weight), where, answerable)


def thumbnail_of_photo(photo: bytes, limits: ImageLimits = ImageLimits()) -> bytes:
    """The JPEG thumbnail the pipeline would store for this photo (same checks, same `downscale`)."""
    try:
        refuse_oversized_file(len(photo), limits)
        return downscale(photo, limits.max_pixels, full_size_jpeg_decode=limits.full_size_jpeg_decode).jpeg
    except ImageRejected as exc:
        raise SimilarError(f"the query image cannot be used: {exc.reason}") from exc


def settings_matching_an_index(
    lake: Lake, weights: str, device: str = "auto", model: str = "resnet50", stored: Sequence[str] | None = None
) -> tuple[EmbeddingSettings, ResolvedWeights]:
    """Settings for these weights whose model_id has an index under the lake, and the weights resolved (a
    state-dict file hashed once, whatever the precisions tried); SimilarError naming the indexes that exist.

    The precision is part of the model_id (`numerics_tag`): an index built with
    fp32 vectors on CPU is queried with fp32 on a GPU too (its `auto` would be
    fp16, another model_id), rather than refused. `stored`: the lake's index model_ids, when the caller read them.
    """
    from imgemb_assets.core.embedding.models import model_id_for  # torch: only for a photo or a text

    stored = stored_model_ids(lake) if stored is None else stored
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
        f"indexes exist for {list(stored)}: query with the weights those were embedded with, or embed the images with "
        f"these weights and run the {REFRESH_JOB} job"
    )


# --- shared -----------------------------------------------------------------------


def _check_query_settings(k: int, sales_weight: float) -> None:
    if k < 1:
        raise SimilarError(f"k must be at least 1, got {k}")
    if not 0.0 <= sales_weight <= 1.0:  # also refuses NaN
        raise SimilarError(f"sales_weight must be between 0 and 1, got {sales_weight}")


def load_index_for_query(lake: Lake, model_id: str) -> SearchIndex:
    """The search index of `model_id` under the lake, holding vectors; SimilarError saying what to run if not."""
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


def _ranked(lake: Lake, neighbours: Sequence[Neighbour], k: int, sales_weight: float) -> list[SimilarImage]:
    return rank_with_sales(neighbours, sales_of(lake, [n.image_id for n in neighbours]), k, sales_weight)


__all__ = [
    "SimilarError",
    "checked_filter",
    "load_index_for_query",
    "refuse_indexes_without_text",
    "settings_matching_an_index",
    "similar_to_id",
    "similar_to_photo",
    "similar_to_text",
    "similar_to_vector",
    "text_settings",
    "thumbnail_of_photo",
]
