"""Stored vectors are reused exactly: only under an identity that names the arithmetic, only while the image's
etag is unchanged (a new etag recomputes that vector alone), only when finite and of the model's width, and
looked up a batch at a time (never the whole partition in memory)."""

from __future__ import annotations

import io
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from imgemb_assets.core.embedding.inference import embed_thumbnails
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.models import load_model, model_id_for
from imgemb_assets.core.embedding.partition import EmbeddingRun, SharedModel, embed_partition_batches
from imgemb_assets.core.imaging.images import downscale
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_support.rows import EMBEDDINGS_SCHEMA, JOINED_SCHEMA

PREFIX = "2026-11-01"
# resnet18 (512 wide) keeps the forward passes cheap on a 2-core machine.
FP32 = EmbeddingSettings(weights="random", model="resnet18", device="cpu", precision="fp32", batch_size=8)
BF16 = EmbeddingSettings(weights="random", model="resnet18", device="cpu", precision="bf16", batch_size=8)
_STORED_COLUMNS = ["image_id", "etag", "model_id", "embedding"]


@pytest.fixture(scope="module")
def thumbnails() -> list[bytes]:
    rng = np.random.default_rng(5)
    out = []
    for _ in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(downscale(buffer.getvalue()).jpeg)
    return out


def _joined(jpegs: list[bytes], ids: list[str] | None = None, etags: dict[str, str] | None = None) -> pa.RecordBatch:
    """Joined rows of `jpegs`; each etag is `etag-<image_id>` unless `etags` gives another."""
    ids = ids if ids is not None else [f"img_{i:04d}" for i in range(len(jpegs))]
    etags = etags or {}
    return pa.RecordBatch.from_pylist(
        [
            {
                "image_id": id_,
                tables.PARTITION_COLUMN: PREFIX,
                "etag": etags.get(id_, f"etag-{id_}"),
                "width": 224,
                "height": 224,
                "image_jpeg": jpeg,
                "sales": 1.0,
            }
            for id_, jpeg in zip(ids, jpegs)
        ],
        schema=JOINED_SCHEMA,
    )


def _embed(
    lake: Lake, thumbnails: list[bytes], settings: EmbeddingSettings, etags: dict[str, str] | None = None
) -> EmbeddingRun:
    """What the embedding step does for one prefix: stream the stored vectors, write the new ones."""
    previous = (
        lake.read_batches(tables.IMAGE_EMBEDDINGS, PREFIX, columns=_STORED_COLUMNS)
        if lake.exists(tables.IMAGE_EMBEDDINGS)
        else None
    )
    run = EmbeddingRun()
    joined = [_joined(thumbnails, etags=etags)]
    batches = embed_partition_batches(joined, previous, SharedModel(settings), EMBEDDINGS_SCHEMA, run)
    lake.write_partition_stream(tables.IMAGE_EMBEDDINGS, batches, EMBEDDINGS_SCHEMA, PREFIX)
    return run


def _stored(lake: Lake) -> pa.Table:
    return lake.read(tables.IMAGE_EMBEDDINGS, PREFIX).sort_by("image_id")


def _vectors(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def test_the_identity_names_the_arithmetic() -> None:
    fp32, bf16 = model_id_for(FP32), model_id_for(BF16)
    assert fp32 == "torchvision/resnet18/random-seed0/fp32"
    assert bf16 == "torchvision/resnet18/random-seed0/bf16-cpu"  # bf16 differs by device beyond 2e-3
    # auto is fp32 on CPU: the same arithmetic, the same id; the runtime does not change a value
    assert model_id_for(EmbeddingSettings(weights="random", model="resnet18", device="cpu")) == fp32
    assert model_id_for(EmbeddingSettings(weights="random", model="resnet18", device="cpu", runtime="eager")) == fp32


def test_an_fp32_run_recomputes_the_vectors_a_bf16_run_stored(tmp_path: Path, thumbnails: list[bytes]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    assert _embed(lake, thumbnails, BF16).images_embedded == len(thumbnails)

    run = _embed(lake, thumbnails, FP32)

    assert (run.images_embedded, run.images_reused) == (len(thumbnails), 0)
    stored = _stored(lake)
    assert set(stored.column("model_id").to_pylist()) == {model_id_for(FP32)}
    expected = embed_thumbnails(load_model(FP32), thumbnails)
    np.testing.assert_array_equal(np.stack(stored.column("embedding").to_numpy(zero_copy_only=False)), expected)
    # and the fp32 vectors are then reused by the next fp32 run, untouched
    again = _embed(lake, thumbnails, FP32)
    assert (again.images_embedded, again.images_reused) == (0, len(thumbnails))
    np.testing.assert_array_equal(np.stack(_stored(lake).column("embedding").to_numpy(zero_copy_only=False)), expected)


def test_a_stored_vector_that_is_not_finite_or_of_another_width_is_recomputed(
    tmp_path: Path, thumbnails: list[bytes]
) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _embed(lake, thumbnails, FP32)
    good = _stored(lake)
    vectors = [list(v) for v in good.column("embedding").to_pylist()]
    vectors[1][7] = float("nan")
    vectors[2][0] = float("inf")
    vectors[3] = vectors[3][:100]  # truncated
    damaged = good.set_column(
        good.schema.get_field_index("embedding"), "embedding", pa.array(vectors, tables.EMBEDDING_TYPE)
    )
    lake.write_partition(tables.IMAGE_EMBEDDINGS, damaged.select(EMBEDDINGS_SCHEMA.names), PREFIX)

    run = _embed(lake, thumbnails, FP32)

    assert (run.images_embedded, run.images_reused, run.stored_refused) == (3, len(thumbnails) - 3, 3)
    assert run.non_finite_rows == 0 and run.widths == {512}
    np.testing.assert_array_equal(
        np.stack(_stored(lake).column("embedding").to_numpy(zero_copy_only=False)),
        np.stack(good.column("embedding").to_numpy(zero_copy_only=False)),
    )


def test_a_changed_etag_recomputes_exactly_that_vector(tmp_path: Path, thumbnails: list[bytes]) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _embed(lake, thumbnails, FP32)
    before = _vectors(_stored(lake))
    changed = 2
    # the object under img_0002 was replaced by another photo: a new etag and new pixels, the same image_id
    replaced = [*thumbnails[:changed], thumbnails[-1], *thumbnails[changed + 1 :]]
    new_etag = {"img_0002": "etag-img_0002-rewritten"}

    run = _embed(lake, replaced, FP32, etags=new_etag)

    assert (run.images_embedded, run.images_reused, run.stored_refused) == (1, len(thumbnails) - 1, 0)
    stored = _stored(lake)
    after = _vectors(stored)
    assert stored.column("etag")[changed].as_py() == new_etag["img_0002"]
    others = [row for row in range(len(thumbnails)) if row != changed]
    np.testing.assert_array_equal(after[others], before[others])  # reused untouched
    # the changed row holds the new photo's vector, computed now (alone in its batch, as the run computed it)
    np.testing.assert_array_equal(after[changed], embed_thumbnails(load_model(FP32), [thumbnails[-1]])[0])
    assert not np.allclose(after[changed], before[changed], atol=1e-3)


# --- memory: the stored vectors of a partition are never all in memory -------------------------------

# ResNet50's width: SharedModel knows it without building the model (which every row here reuses).
RESNET50 = EmbeddingSettings(weights="random", device="cpu")
WIDTH = 2048
ROWS_PER_BATCH = 1024
BATCH_BYTES = ROWS_PER_BATCH * WIDTH * 4  # 8 MiB of vectors a batch
_COMPONENTS = np.arange(WIDTH, dtype=np.float32) / 1024


def _stored_vector(row: int) -> np.ndarray:
    return np.float32(row) + _COMPONENTS  # distinct per row, and cheap to make again


def _stored_batches(model_id: str, batches: int) -> Iterator[pa.RecordBatch]:
    """The stored partition as the lake streams it, made batch by batch.

    The vectors live in numpy-owned buffers, so tracemalloc sees every stored batch still held.
    """
    for index in range(batches):
        rows = range(index * ROWS_PER_BATCH, (index + 1) * ROWS_PER_BATCH)
        vectors = np.add.outer(np.arange(rows.start, rows.stop, dtype=np.float32), _COMPONENTS)
        yield pa.RecordBatch.from_pydict(
            {
                "image_id": [f"img_{row:06d}" for row in rows],
                "etag": [f"etag-img_{row:06d}" for row in rows],
                "model_id": [model_id] * ROWS_PER_BATCH,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), WIDTH).cast(
                    tables.EMBEDDING_TYPE
                ),
            }
        )


def _reuse_peak_bytes(batches: int, jpeg: bytes) -> int:
    """Peak traced memory (Python and numpy) of re-embedding a partition whose every vector is stored."""
    shared = SharedModel(RESNET50)
    rows = batches * ROWS_PER_BATCH
    # the joined rows come in another order than the stored ones, half of them in runs
    order = np.random.default_rng(0).permutation(rows)
    order[: rows // 2].sort()
    ids = [f"img_{row:06d}" for row in order]
    joined = (
        _joined([jpeg] * ROWS_PER_BATCH, ids[start : start + ROWS_PER_BATCH])
        for start in range(0, rows, ROWS_PER_BATCH)
    )
    run = EmbeddingRun()
    checked = 0
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        stored = _stored_batches(shared.model_id, batches)
        for batch in embed_partition_batches(joined, stored, shared, EMBEDDINGS_SCHEMA, run):
            vectors = batch.column("embedding")
            for position in (0, batch.num_rows - 1):  # spot-check: the vector stored for that image
                row = int(batch.column("image_id")[position].as_py().removeprefix("img_"))
                np.testing.assert_array_equal(np.asarray(vectors[position].as_py(), np.float32), _stored_vector(row))
                checked += 1
            del batch, vectors
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert (run.images_reused, run.images_embedded, run.model) == (rows, 0, None)
    assert checked == 2 * batches
    return peak


def test_stored_vectors_are_looked_up_a_batch_at_a_time(thumbnails: list[bytes]) -> None:
    small = _reuse_peak_bytes(4, thumbnails[0])  # 32 MiB of stored vectors
    large = _reuse_peak_bytes(16, thumbnails[0])  # 128 MiB
    # 96 MiB more vectors cost less than one batch more: the key index (~250 bytes a row)
    # grows with the partition, the vectors in memory do not.
    assert large - small < BATCH_BYTES
    assert large < 8 * BATCH_BYTES  # a few batches' worth: the joined batch, its read buffer, drift moments
