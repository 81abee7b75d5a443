"""A vector is non-finite as soon as one of its values is: a model whose output has a single infinite component (what
an fp16 overflow gives) has each such vector counted by `embed_partition_batches` and fails the `embedding_values`
check, while the stored, finite vectors reused beside them are not counted."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchvision.models import resnet18

from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.partition import EmbeddingRun, SharedModel, embed_partition_batches
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.embedding_column import embedding_array
from imgemb_assets.core.quality.checks import embedding_values
from imgemb_support.rows import EMBEDDINGS_SCHEMA, JOINED_SCHEMA, random_thumbnails

PREFIX = "2026-11-01"
WIDTH = 512  # resnet18 without its classifier
INFINITE_COMPONENT = 7
IMAGES = 6
STORED = 2  # the first images have a finite vector stored under the model's id: reused, never through the model


@pytest.fixture(scope="module")
def thumbnails() -> list[bytes]:
    return random_thumbnails(IMAGES, seed=11, size=(120, 160))


@pytest.fixture(scope="module")
def one_infinite_component(tmp_path_factory: pytest.TempPathFactory) -> EmbeddingSettings:
    """resnet18 weights whose last block adds +inf to one channel: each vector gets exactly one infinite value."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = resnet18(weights=None)
    with torch.no_grad():
        # the channel then stays +inf through the residual add, the ReLU and the average pool; no other channel mixes it
        model.layer4[1].bn2.bias[INFINITE_COMPONENT] = float("inf")
    path = tmp_path_factory.mktemp("weights") / "one-inf.pt"
    torch.save(model.state_dict(), path)
    return EmbeddingSettings(weights=str(path), model="resnet18", device="cpu", precision="fp32", batch_size=8)


def _joined(jpegs: list[bytes]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [
            {
                "image_id": f"img_{i:04d}",
                tables.PARTITION_COLUMN: PREFIX,
                "etag": f"etag-{i}",
                "width": 224,
                "height": 224,
                "image_jpeg": jpeg,
                "sales": 1.0,
            }
            for i, jpeg in enumerate(jpegs)
        ],
        schema=JOINED_SCHEMA,
    )


def _stored(model_id: str, vectors: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "image_id": [f"img_{i:04d}" for i in range(len(vectors))],
            "etag": [f"etag-{i}" for i in range(len(vectors))],
            "model_id": [model_id] * len(vectors),
            "embedding": embedding_array(vectors),
        }
    )


def test_a_vector_with_one_infinite_value_is_counted_and_fails_the_check(
    thumbnails: list[bytes], one_infinite_component: EmbeddingSettings
) -> None:
    shared = SharedModel(one_infinite_component)
    stored_vectors = np.random.default_rng(3).random((STORED, WIDTH), dtype=np.float32)
    run = EmbeddingRun()

    written = pa.Table.from_batches(
        list(
            embed_partition_batches(
                [_joined(thumbnails)], _stored(shared.model_id, stored_vectors), shared, EMBEDDINGS_SCHEMA, run
            )
        )
    )

    vectors = np.stack(written.column("embedding").to_numpy(zero_copy_only=False))
    embedded = vectors[STORED:]
    # the premise: each embedded vector holds exactly one non-finite value, +inf, and is finite everywhere else
    assert (run.images_embedded, run.images_reused) == (IMAGES - STORED, STORED)
    assert np.array_equal(np.argwhere(~np.isfinite(embedded))[:, 1], [INFINITE_COMPONENT] * (IMAGES - STORED))
    assert np.all(np.isposinf(embedded[:, INFINITE_COMPONENT]))
    np.testing.assert_array_equal(vectors[:STORED], stored_vectors)
    # each of them is counted, the reused finite ones are not
    assert (run.non_finite_rows, run.rows, run.widths) == (IMAGES - STORED, IMAGES, {WIDTH})

    outcome = embedding_values(run.widths, run.width, run.non_finite_rows, run.rows)

    assert not outcome.passed
    assert f"{IMAGES - STORED} of {IMAGES} vectors hold NaN or infinite values" in outcome.description
    assert outcome.metadata["non_finite_rows"] == IMAGES - STORED
