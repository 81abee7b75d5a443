"""Keeping one search index per model in step with the embedding table, and the near duplicates of what changed.

A refresh compares each partition's fingerprint in the embedding table (its data
files, `Lake.partition_fingerprints`) with the fingerprints the stored indexes
recorded, reads only the partitions that changed, and routes each one's vectors
to the index of the model that wrote them: vectors of two models never share an
index. Every index records every partition it was shown, with zero vectors where
its model wrote none, so a partition is read again only when it was rewritten.

An index made for a model that appears for the first time takes the unchanged
partitions as empty without reading them: they were read at an earlier refresh,
when that model had no vectors anywhere (or it would have had an index).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from imgemb_assets.core import tables
from imgemb_assets.core.lake import Lake
from imgemb_assets.core.near_duplicates import DEFAULT_SIMILARITY_THRESHOLD, NearDuplicates, find_near_duplicates
from imgemb_assets.core.search_index import (
    PartitionVectors,
    SearchIndex,
    UpdateReport,
    load_index,
    read_partition_models,
    save_index,
    stored_model_ids,
)


@dataclass(frozen=True)
class ModelRefresh:
    index: SearchIndex
    update: UpdateReport
    # The read partitions holding vectors of this model: whose near duplicates to look for.
    with_vectors: dict[str, PartitionVectors]


@dataclass(frozen=True)
class IndexRefresh:
    models: dict[str, ModelRefresh]
    partitions_read: tuple[str, ...]
    partitions_removed: tuple[str, ...]
    seconds: float


def refresh_search_indexes(lake: Lake, table: str = tables.IMAGE_EMBEDDINGS) -> IndexRefresh:
    """Every model's index brought up to the embedding table's partitions now, and saved where it changed."""
    started = time.perf_counter()
    current = lake.partition_fingerprints(table)
    indexes = {model_id: load_index(lake, model_id) for model_id in stored_model_ids(lake)}
    recorded = [index.fingerprints() for index in indexes.values()]
    to_read = sorted(
        prefix for prefix, fingerprint in current.items()
        if not recorded or any(fingerprints.get(prefix) != fingerprint for fingerprints in recorded)
    )  # fmt: skip
    removed = sorted({prefix for fingerprints in recorded for prefix in fingerprints} - set(current))
    read = {prefix: read_partition_models(lake, prefix, current[prefix], table) for prefix in to_read}
    found_models = {model_id for by_model in read.values() for model_id in by_model}
    models: dict[str, ModelRefresh] = {}
    for model_id in sorted(set(indexes) | found_models):
        index = indexes.get(model_id) or SearchIndex(model_id, _width_of(model_id, read))
        shown = [by_model.get(model_id) or _empty(prefix, current[prefix], index.width) for prefix, by_model in read.items()]
        if model_id not in indexes:
            shown += [_empty(prefix, fingerprint, index.width) for prefix, fingerprint in current.items() if prefix not in read]
        update = index.update(shown, removed)
        if update.partitions_touched:
            save_index(index, lake)
        with_vectors = {prefix: by_model[model_id] for prefix, by_model in read.items() if model_id in by_model}
        models[model_id] = ModelRefresh(index, update, with_vectors)
    return IndexRefresh(models, tuple(to_read), tuple(removed), time.perf_counter() - started)


def near_duplicates_of_changes(
    refresh: IndexRefresh, threshold: float = DEFAULT_SIMILARITY_THRESHOLD
) -> dict[str, dict[str, NearDuplicates]]:
    """prefix -> model_id -> the near-duplicate pairs of that partition's images against the model's whole index."""
    found: dict[str, dict[str, NearDuplicates]] = {prefix: {} for prefix in refresh.partitions_read}
    for model_id, model in refresh.models.items():
        for prefix, vectors in model.with_vectors.items():
            found[prefix][model_id] = find_near_duplicates(
                vectors.image_ids, vectors.vectors, prefix, model_id, model.index.search, threshold=threshold
            )
    return found


def write_near_duplicates(lake: Lake, found: Mapping[str, Mapping[str, NearDuplicates]], removed: Sequence[str]) -> int:
    """Replace the near-duplicate rows of every partition read (maybe with none) and drop removed ones; rows written."""
    rows = [result.table for by_model in found.values() for result in by_model.values()]
    data = pa.concat_tables(rows) if rows else tables.NEAR_DUPLICATES_SCHEMA.empty_table()
    lake.replace_partitions(tables.NEAR_DUPLICATES, data, [*found, *removed])
    return data.num_rows


def _width_of(model_id: str, read: Mapping[str, Mapping[str, PartitionVectors]]) -> int:
    for by_model in read.values():
        vectors = by_model.get(model_id)
        if vectors is not None and vectors.vectors.size:
            return int(vectors.vectors.shape[1])
    raise ValueError(f"no vector of {model_id!r} was read: its width is unknown")


def _empty(prefix: str, fingerprint: str, width: int) -> PartitionVectors:
    return PartitionVectors(prefix, fingerprint, [], np.empty((0, width), np.float32))
