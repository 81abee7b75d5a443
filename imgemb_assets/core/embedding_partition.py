"""Embedding a partition's joined rows, batch by batch, reusing stored vectors where nothing changed."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgemb_assets.core.drift import EmbeddingMoments, vectors_of
from imgemb_assets.core.embedding import embed_thumbnails
from imgemb_assets.core.model_config import EmbeddingSettings
from imgemb_assets.core.models import EmbeddingModel, load_model, model_id_for
from imgemb_assets.core.tables import EMBEDDING_TYPE


class SharedModel:
    """The model of one step, shared by every partition it embeds: built once, on first use.

    A step that finds every vector already stored never builds it at all.
    """

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        # Computed once: for a state-dict file it hashes the file.
        self.model_id = model_id_for(settings)
        self._model: EmbeddingModel | None = None

    def get(self) -> EmbeddingModel:
        if self._model is None:
            self._model = load_model(self.settings)
        return self._model


@dataclass
class EmbeddingRun:
    """What embedding a partition took; filled in while its batches stream through."""

    images_embedded: int = 0  # went through the model
    images_reused: int = 0  # kept their stored vector
    seconds: float = 0.0  # decoding and inference of the embedded images
    model: EmbeddingModel | None = None  # None while this partition reused every vector
    model_id: str = ""  # on every row written; set when the stream starts
    rows: int = 0
    widths: set[int] = field(default_factory=set)  # vector widths written (one, when all is well)
    non_finite_rows: int = 0  # vectors holding NaN or infinite values
    moments: EmbeddingMoments = field(default_factory=EmbeddingMoments)  # of the vectors written, for drift

    @property
    def images_per_second(self) -> float:
        return self.images_embedded / self.seconds if self.seconds > 0 else 0.0


def embed_partition_batches(
    joined: Iterable[pa.RecordBatch],
    previous: pa.Table | None,
    shared: SharedModel,
    schema: pa.Schema,
    run: EmbeddingRun,
) -> Iterator[pa.RecordBatch]:
    """The joined rows, batch by batch, with their image replaced by its embedding and the model's id.

    A row whose image_id, content fingerprint (etag) and model_id match a row of
    `previous` (the partition as stored) keeps that vector; only new or changed
    images go through the model, which is loaded only when the first one comes.
    """
    model_id = run.model_id = shared.model_id
    stored = _stored_vectors(previous, model_id)
    for batch in joined:
        if batch.num_rows == 0:
            continue
        keys = list(zip(batch.column("image_id").to_pylist(), batch.column("etag").to_pylist()))
        to_embed = [row for row, key in enumerate(keys) if key not in stored.index]
        reused = [row for row, key in enumerate(keys) if key in stored.index]
        if to_embed and run.model is None:
            run.model = shared.get()
        width = run.model.width if run.model else stored.vectors.shape[1]
        vectors = np.empty((batch.num_rows, width), dtype=np.float32)
        if to_embed:
            assert run.model is not None
            started = time.perf_counter()
            vectors[to_embed] = embed_thumbnails(run.model, batch.column("image_jpeg").take(pa.array(to_embed)).to_pylist())
            run.seconds += time.perf_counter() - started
        if reused:
            vectors[reused] = stored.vectors[[stored.index[keys[row]] for row in reused]]
        run.images_embedded += len(to_embed)
        run.images_reused += len(reused)
        run.rows += batch.num_rows
        run.widths.add(width)
        run.non_finite_rows += int((~np.isfinite(vectors).all(axis=1)).sum())
        run.moments.add(vectors)
        table = (
            pa.Table.from_batches([batch])
            .append_column("embedding", embedding_array(vectors))
            .append_column("model_id", pa.array([model_id] * batch.num_rows, pa.string()))
        )
        yield from table.select(schema.names).cast(schema).to_batches()


@dataclass(frozen=True)
class _StoredVectors:
    index: dict[tuple[str, str], int]  # (image_id, etag) -> row of `vectors`
    vectors: np.ndarray


def _stored_vectors(previous: pa.Table | None, model_id: str) -> _StoredVectors:
    if previous is None or previous.num_rows == 0:
        return _StoredVectors({}, np.empty((0, 0), np.float32))
    same_model = previous.filter(pc.equal(previous.column("model_id"), model_id))
    if same_model.num_rows == 0:
        return _StoredVectors({}, np.empty((0, 0), np.float32))
    vectors = vectors_of(same_model.column("embedding"))
    keys = zip(same_model.column("image_id").to_pylist(), same_model.column("etag").to_pylist())
    return _StoredVectors({key: row for row, key in enumerate(keys)}, vectors)


def embedding_array(vectors: np.ndarray) -> pa.Array:
    """(N, width) float32 -> list<float32>; Delta has no fixed-size list type."""
    width = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width).cast(EMBEDDING_TYPE)
