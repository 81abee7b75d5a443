"""Embedding drift between two partitions, from streamed moments."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from imgemb_assets.core.embedding.drift import (
    DriftThresholds,
    EmbeddingMoments,
    embedding_drift,
    moments_of_batches,
    previous_partition,
)
from imgemb_assets.core.lake.embedding_column import embedding_array

WIDTH = 64


def _moments(vectors: np.ndarray, batch_rows: int = 100) -> EmbeddingMoments:
    moments = EmbeddingMoments()
    for start in range(0, len(vectors), batch_rows):
        moments.add(vectors[start : start + batch_rows])
    return moments


def _sample(rng: np.random.Generator, mean: float = 1.0, scale: float = 0.3, rows: int = 2_000) -> np.ndarray:
    # Post-ReLU features are non-negative with a common positive centre.
    return np.abs(rng.normal(mean, scale, (rows, WIDTH))).astype(np.float32)


def test_streamed_moments_equal_numpy_and_skip_non_finite_rows() -> None:
    vectors = _sample(np.random.default_rng(0))
    with_nan = np.vstack([vectors, np.full((1, WIDTH), np.nan, np.float32)])
    moments = _moments(with_nan, batch_rows=333)
    assert moments.count == len(vectors)
    assert np.allclose(moments.mean, vectors.mean(axis=0), atol=1e-6)
    assert np.allclose(moments.variance, vectors.var(axis=0), atol=1e-6)


def test_same_distribution_passes() -> None:
    rng = np.random.default_rng(1)
    outcome = embedding_drift(_moments(_sample(rng)), _moments(_sample(rng)), "p0", DriftThresholds())
    assert outcome.passed, outcome.description
    assert outcome.metadata["mean_shift"] < 0.05 and outcome.metadata["centroid_cosine"] > 0.99


def test_a_moved_centre_fails_mean_shift_and_centroid_cosine() -> None:
    rng = np.random.default_rng(2)
    before = _sample(rng)
    after = _sample(rng)
    after[:, : WIDTH // 2] += 3.0  # half the dimensions move far away
    outcome = embedding_drift(_moments(after), _moments(before), "p0", DriftThresholds())
    assert not outcome.passed
    assert "mean shift" in outcome.description and "centroid cosine" in outcome.description


def test_collapsed_variance_fails_variance_shift_only() -> None:
    rng = np.random.default_rng(3)
    before = _sample(rng)
    after = _sample(rng, scale=0.03)  # same centre, a tenth of the spread
    outcome = embedding_drift(_moments(after), _moments(before), "p0", DriftThresholds())
    assert not outcome.passed
    assert "variance shift" in outcome.description
    assert "mean shift" not in outcome.description.split("(")[0]


def test_no_previous_partition_passes_and_says_so() -> None:
    outcome = embedding_drift(_moments(_sample(np.random.default_rng(4))), None, None, DriftThresholds())
    assert outcome.passed and "no earlier partition" in outcome.description


def test_previous_partition_is_the_greatest_key_below() -> None:
    assert previous_partition(["2026-11-01", "2026-11-03", "2026-11-02"], "2026-11-03") == "2026-11-02"
    assert previous_partition(["2026-11-02", "2026-11-03"], "2026-11-01") is None


def test_moments_of_batches_count_only_the_given_model() -> None:
    vectors = _sample(np.random.default_rng(5), rows=10)
    batch = pa.record_batch(
        {"model_id": ["m1"] * 6 + ["m2"] * 4, "embedding": embedding_array(vectors)},
    )
    moments = moments_of_batches([batch], "m1")
    assert moments.count == 6
    assert np.allclose(moments.mean, vectors[:6].mean(axis=0))


def test_too_few_vectors_are_not_judged() -> None:
    rng = np.random.default_rng(6)
    far = _sample(rng, mean=5.0, rows=10)
    outcome = embedding_drift(_moments(far), _moments(_sample(rng)), "p0", DriftThresholds(min_vectors=30))
    assert outcome.passed and "too few vectors" in outcome.description
