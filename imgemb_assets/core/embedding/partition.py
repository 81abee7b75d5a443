"""Embedding a partition's joined rows, batch by batch, reusing stored vectors where nothing changed.

Vectors are reused from the partition as stored and from the vectors an earlier,
interrupted attempt staged (`embedding_staging`); each model batch computed here is
staged in turn before the next one runs, and progress is counted as rows come out.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgemb_assets.core.embedding.drift import EmbeddingMoments
from imgemb_assets.core.embedding.inference import iter_embeddings
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings, resolve_weights
from imgemb_assets.core.embedding.models import EmbeddingModel, load_model, model_id_for
from imgemb_assets.core.embedding.progress import Progress
from imgemb_assets.core.lake.embedding_column import embedding_array

if TYPE_CHECKING:
    from imgemb_assets.core.embedding.staging import PartitionStaging


class SharedModel:
    """The model of one step, shared by every partition it embeds: built once, on first use.

    A step that finds every vector already stored never builds it at all.
    """

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        # Resolved once (a state-dict file hashed once) for the id and, later, the model.
        self.weights = resolve_weights(settings.weights)
        self.model_id = model_id_for(settings, self.weights)
        self.width = settings.width
        self._model: EmbeddingModel | None = None

    def get(self) -> EmbeddingModel:
        if self._model is None:
            self._model = load_model(self.settings, self.weights)
        return self._model


@dataclass
class EmbeddingRun:
    """What embedding a partition took; filled in while its batches stream through."""

    images_embedded: int = 0  # went through the model
    images_reused: int = 0  # kept their stored vector (in the table, or staged by an earlier attempt)
    images_resumed: int = 0  # of those, the vectors an earlier, interrupted attempt had staged
    seconds: float = 0.0  # decoding, inference and staging of the embedded images
    staging_seconds: float = 0.0  # of those, writing the staged batches
    model: EmbeddingModel | None = None  # None while this partition reused every vector
    model_id: str = ""  # on every row written; set when the stream starts
    width: int = 0  # the model's vector width; set when the stream starts
    stored_refused: int = 0  # stored under this model_id but NaN, infinite or of another width: recomputed
    rows: int = 0
    widths: set[int] = field(default_factory=set)  # vector widths written (one, when all is well)
    non_finite_rows: int = 0  # vectors holding NaN or infinite values
    moments: EmbeddingMoments = field(default_factory=EmbeddingMoments)  # of the vectors written, for drift

    @property
    def images_per_second(self) -> float:
        return self.images_embedded / self.seconds if self.seconds > 0 else 0.0

    def model_metadata(self) -> dict[str, str | int | float | bool]:
        """What ran the model, for the step's metadata: weights, width, device, precision, batch size, decoder, compile."""
        if self.model is None:
            return {"weights": "model not loaded: every vector was reused"}
        return {
            "weights": self.model.weights_description,
            "embedding_width": self.model.width,
            "device": str(self.model.device),
            "precision": str(self.model.dtype).removeprefix("torch."),
            "batch_size": self.model.batch_size,
            # decoder and why auto skipped a better one; compiled, its mode, seconds and any failure
            **{key: value for key, value in self.model.runtime_metadata().items() if value is not None},
        }


def embed_partition_batches(
    joined: Iterable[pa.RecordBatch],
    previous: Iterable[pa.RecordBatch] | pa.Table | None,
    shared: SharedModel,
    schema: pa.Schema,
    run: EmbeddingRun,
    *,
    staging: PartitionStaging | None = None,
    progress: Progress | None = None,
) -> Iterator[pa.RecordBatch]:
    """The joined rows, batch by batch, with their image replaced by its embedding and the model's id.

    A row whose image_id, content fingerprint (etag) and model_id match a row of
    `previous` (the partition as stored, best streamed in batches with the
    columns image_id, etag, model_id and embedding) keeps that vector, unless the
    stored vector is not finite or not of the model's width; only new, changed or
    refused images go through the model, which is loaded only when the first one comes.
    The stored vectors are spooled to a local file first and read back a batch at
    a time: memory holds one batch of them whatever the partition's size, plus
    their key index (about 250 bytes a stored row, see `StoredVectors`).

    With `staging`, the vectors it holds (staged by an interrupted attempt at this
    partition and model) are reused like stored ones, and each model batch computed
    here is staged before the next one goes through the model, so a kill loses at
    most the batch in the model (on CUDA, whose host runs one batch behind the GPU,
    also the batch being staged). `progress` is advanced by every row, embedded or reused.
    """
    model_id = run.model_id = shared.model_id
    width = run.width = shared.width
    staged = staging.read() if staging is not None else ()
    with StoredVectors.spooled(_record_batches(previous), model_id, width, staged) as stored:
        run.stored_refused = stored.refused
        for batch in joined:
            if batch.num_rows == 0:
                continue
            keys = zip(batch.column("image_id").to_pylist(), batch.column("etag").to_pylist())
            stored_rows = [stored.row_of(key) for key in keys]
            to_embed = [row for row, stored_row in enumerate(stored_rows) if stored_row is None]
            reused = [(row, stored_row) for row, stored_row in enumerate(stored_rows) if stored_row is not None]
            vectors = np.empty((batch.num_rows, width), dtype=np.float32)
            if reused:
                vectors[[row for row, _ in reused]] = stored.read([stored_row for _, stored_row in reused])
                run.images_reused += len(reused)
                run.images_resumed += sum(1 for _, stored_row in reused if stored.is_staged(stored_row))
                if progress is not None:
                    progress.advance(len(reused))
            if to_embed:
                if run.model is None:
                    run.model = shared.get()
                _embed_rows(batch, to_embed, vectors, run, staging, progress)
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


def _embed_rows(
    batch: pa.RecordBatch,
    rows: list[int],
    vectors: np.ndarray,
    run: EmbeddingRun,
    staging: PartitionStaging | None,
    progress: Progress | None,
) -> None:
    """Fill `vectors[rows]` through the model, a model batch at a time, staging each before the next runs."""
    assert run.model is not None
    started = time.perf_counter()
    taken = pa.array(rows)
    jpegs = batch.column("image_jpeg").take(taken).to_pylist()
    image_ids = batch.column("image_id").take(taken).to_pylist() if staging is not None else []
    etags = batch.column("etag").take(taken).to_pylist() if staging is not None else []
    start = 0
    for computed in iter_embeddings(run.model, jpegs):
        end = start + len(computed)
        vectors[rows[start:end]] = computed
        if staging is not None:
            # Before the next batch goes through the model on CPU, so a kill loses only the batch in
            # the model; on CUDA the next one is already queued (the host runs one batch behind), and
            # the write overlaps its forward pass.
            staged_at = time.perf_counter()
            staging.write(image_ids[start:end], etags[start:end], computed)
            run.staging_seconds += time.perf_counter() - staged_at
        run.images_embedded += len(computed)
        if progress is not None:
            progress.advance(len(computed))
        start = end
    run.seconds += time.perf_counter() - started


# Rows per batch when `previous` comes as a whole table (2048 floats are 8 KiB a row).
_SPOOL_BATCH_ROWS: Final = 4096


def _record_batches(previous: Iterable[pa.RecordBatch] | pa.Table | None) -> Iterable[pa.RecordBatch]:
    if previous is None:
        return ()
    if isinstance(previous, pa.Table):
        return previous.to_batches(max_chunksize=_SPOOL_BATCH_ROWS)
    return previous


class StoredVectors:
    """A partition's reusable stored vectors, in a local spool file, looked up by (image_id, etag).

    In memory: the key index (about 250 bytes a row) and the batch being read;
    the vectors themselves (8 KiB a row for ResNet50) stay in the file. Only
    vectors written under the current model_id, of its width and finite are
    spooled: a NaN, infinite or truncated vector is recomputed, never carried forward.
    """

    def __init__(self, spool: BinaryIO, width: int) -> None:
        self.width = width
        self.refused = 0  # rows under the model_id that were not finite or not of the width
        self._spool = spool
        self._row_bytes = width * np.dtype(np.float32).itemsize
        self._index: dict[tuple[str, str], int] = {}  # (image_id, etag) -> spool row
        self._rows = 0  # spooled so far
        self._first_staged_row: int | None = None  # rows from here on came from staged batches

    @classmethod
    @contextmanager
    def spooled(
        cls,
        batches: Iterable[pa.RecordBatch],
        model_id: str,
        width: int,
        staged: Iterable[pa.RecordBatch] = (),
    ) -> Iterator[StoredVectors]:
        """The reusable vectors of `batches`, then of `staged` (keys not already found), read once.

        `staged` are batches an interrupted attempt staged (`PartitionStaging.read`), with the
        same four columns; the spool file is deleted on exit.
        """
        with tempfile.TemporaryFile(prefix="imgemb-vectors-") as spool:
            stored = cls(spool, width)
            stored._spool_all(batches, model_id)
            stored._first_staged_row = stored._rows
            stored._spool_all(staged, model_id, only_new_keys=True)
            yield stored

    def __len__(self) -> int:
        return len(self._index)

    def row_of(self, key: tuple[str, str]) -> int | None:
        return self._index.get(key)

    def is_staged(self, row: int) -> bool:
        """Whether spool row `row` came from a staged batch rather than from the stored partition."""
        return self._first_staged_row is not None and row >= self._first_staged_row

    def read(self, rows: Sequence[int]) -> np.ndarray:
        """The vectors of spool rows `rows`, in that order, as (len(rows), width) float32."""
        out = np.empty((len(rows), self.width), dtype=np.float32)
        start = 0
        while start < len(rows):
            # One read per run of consecutive rows (the common case: the joined rows
            # come in the order the partition was written).
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            self._read_into(out[start:end], rows[start] * self._row_bytes)
            start = end
        return out

    # Read with preadv rather than through a memory map: mapped pages would count in the
    # step's resident memory and grow with the partition, which this class exists to avoid.
    def _read_into(self, block: np.ndarray, offset: int) -> None:
        view = memoryview(block).cast("B")  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        done = 0
        while done < len(view):
            got = os.preadv(self._spool.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise EOFError(f"vector spool ended at byte {offset + done}")
            done += got

    def _spool_all(self, batches: Iterable[pa.RecordBatch], model_id: str, only_new_keys: bool = False) -> None:
        # A method of its own, so no stored batch outlives it.
        for batch in batches:
            self._add(batch, model_id, only_new_keys)
        self._spool.flush()

    def _add(self, batch: pa.RecordBatch, model_id: str, only_new_keys: bool = False) -> None:
        same_model = batch.filter(pc.equal(batch.column("model_id"), model_id))
        if same_model.num_rows == 0:
            return
        lengths = pc.list_value_length(same_model.column("embedding"))
        right_width = same_model.filter(pc.fill_null(pc.equal(lengths, self.width), False))
        vectors = right_width.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(-1, self.width)
        finite = np.isfinite(vectors).all(axis=1)
        self.refused += same_model.num_rows - int(finite.sum())
        keys = list(zip(right_width.column("image_id").to_pylist(), right_width.column("etag").to_pylist()))
        if only_new_keys:  # a vector the partition already holds is not spooled twice
            finite &= np.array([key not in self._index for key in keys], dtype=bool)
        kept = [key for key, ok in zip(keys, finite) if ok]
        # Written from Arrow's own buffer when every vector is good (no copy).
        self._spool.write(np.ascontiguousarray(vectors if finite.all() else vectors[finite], dtype=np.float32).data)
        self._index.update((key, self._rows + offset) for offset, key in enumerate(kept))
        self._rows += len(kept)
