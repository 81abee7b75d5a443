"""A partition's vectors as the search index takes them (`PartitionVectors`, read from the embedding table by
`read_partition_models`) and as it holds them (`IndexedPartition`: L2-normalised, keyed, and the segment that stores
them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from imgemb_assets.core.lake.embedding_column import vectors_of
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import IMAGE_EMBEDDINGS


@dataclass(frozen=True)
class PartitionVectors:
    """One partition's vectors of one model: row i of `vectors` is the embedding of `image_ids[i]`."""

    prefix: str
    fingerprint: str  # opaque; changes whenever the partition's Delta files change
    image_ids: Sequence[str]
    vectors: np.ndarray  # (N, width), any float dtype; normalised by the index


@dataclass
class IndexedPartition:
    """One partition as the index holds it."""

    fingerprint: str
    keys: np.ndarray  # uint64, the ANN keys of the rows
    image_ids: list[str]
    vectors: np.ndarray  # (N, width) float32, L2-normalised
    row_of_id: dict[str, int]
    # the segment (under the index folder) holding its rows, as the stored manifest says;
    # None until saved, and always None for a partition with no vectors (it has no rows)
    segment: str | None = None


def read_partition_models(
    lake: Lake, prefix: str, fingerprint: str, table: str = IMAGE_EMBEDDINGS
) -> dict[str, PartitionVectors]:
    """One partition's vectors, per model that wrote some, each with `fingerprint`.

    Take the fingerprint (`Lake.partition_fingerprints`) before reading: a rewrite
    in between leaves an old fingerprint, so the next update reads the partition
    again (never the reverse).
    """
    rows = lake.read(table, prefix, columns=["image_id", "model_id", "embedding"])
    found: dict[str, PartitionVectors] = {}
    for model_id in sorted(set(rows.column("model_id").to_pylist())):
        of_model = rows.filter(pc.equal(rows.column("model_id"), model_id))
        found[model_id] = PartitionVectors(
            prefix, fingerprint, of_model.column("image_id").to_pylist(), vectors_of(of_model.column("embedding"))
        )
    return found
