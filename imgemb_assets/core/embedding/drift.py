"""Embedding drift: a partition's vectors against the partition before it.

Three numbers, as the article recommends monitoring:
- mean shift: distance between the two mean vectors, in units of the earlier
  partition's total standard deviation (0 = same centre);
- variance shift: relative change of the per-dimension variances
  (sum |var_now - var_before| / sum var_before);
- centroid cosine: cosine similarity of the two mean vectors.

Moments are accumulated batch by batch in float64, so neither partition is
ever held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgemb_assets.core.lake.embedding_column import vectors_of
from imgemb_assets.core.quality.checks import CheckOutcome

_EPSILON = 1e-12
# Vectors per batch a caller should stream a stored partition in: moments are
# summed in float64, 1024 x 2048 x 8 bytes = 16 MiB at a time.
MOMENTS_BATCH_ROWS = 1024


@dataclass(frozen=True)
class DriftThresholds:
    max_mean_shift: float = 0.5
    max_variance_shift: float = 0.5
    min_centroid_cosine: float = 0.9
    # Per-dimension variances of a handful of vectors are mostly noise: below
    # this many vectors on either side the check passes and says why.
    min_vectors: int = 30


class EmbeddingMoments:
    """Count, sum and sum of squares of finite vectors, per dimension."""

    def __init__(self) -> None:
        self.count = 0
        self._sum: np.ndarray | None = None
        self._sum_of_squares: np.ndarray | None = None

    def add(self, vectors: np.ndarray) -> None:
        finite = vectors[np.isfinite(vectors).all(axis=1)].astype(np.float64)
        if finite.shape[0] == 0:
            return
        if self._sum is None or self._sum_of_squares is None:
            self._sum = np.zeros(finite.shape[1])
            self._sum_of_squares = np.zeros(finite.shape[1])
        self._sum += finite.sum(axis=0)
        self._sum_of_squares += np.square(finite).sum(axis=0)
        self.count += finite.shape[0]

    @property
    def mean(self) -> np.ndarray:
        assert self._sum is not None, "no vectors added"
        return self._sum / self.count

    @property
    def variance(self) -> np.ndarray:
        assert self._sum_of_squares is not None, "no vectors added"
        return np.maximum(self._sum_of_squares / self.count - np.square(self.mean), 0.0)


def moments_of_batches(batches: Iterable[pa.RecordBatch], model_id: str) -> EmbeddingMoments:
    """Moments of the `embedding` column over the rows written by `model_id`."""
    moments = EmbeddingMoments()
    for batch in batches:
        rows = batch.filter(pc.equal(batch.column("model_id"), model_id))
        if rows.num_rows:
            moments.add(vectors_of(rows.column("embedding")))
    return moments


def previous_partition(partition_keys: Iterable[str], current: str) -> str | None:
    """The greatest key below `current` (date-like prefixes sort in time order)."""
    earlier = [key for key in partition_keys if key < current]
    return max(earlier) if earlier else None


def embedding_drift(
    current: EmbeddingMoments,
    previous: EmbeddingMoments | None,
    previous_key: str | None,
    thresholds: DriftThresholds,
) -> CheckOutcome:
    if previous is None or previous_key is None or previous.count == 0:
        return CheckOutcome(True, "no earlier partition embedded with this model to compare with")
    if min(current.count, previous.count) < thresholds.min_vectors:
        return CheckOutcome(
            True,
            f"too few vectors to judge drift against {previous_key!r}: {current.count} here, "
            f"{previous.count} there, at least {thresholds.min_vectors} on each side needed",
            {"previous_partition": previous_key, "vectors": current.count, "previous_vectors": previous.count},
        )
    if current.mean.shape != previous.mean.shape:
        return CheckOutcome(
            False, f"width {current.mean.shape[0]} differs from {previous_key!r}'s {previous.mean.shape[0]}"
        )
    mean_shift = float(np.linalg.norm(current.mean - previous.mean) / np.sqrt(previous.variance.sum() + _EPSILON))
    variance_shift = float(np.abs(current.variance - previous.variance).sum() / (previous.variance.sum() + _EPSILON))
    centroid_cosine = float(
        current.mean @ previous.mean / (np.linalg.norm(current.mean) * np.linalg.norm(previous.mean) + _EPSILON)
    )
    breaches = []
    if mean_shift > thresholds.max_mean_shift:
        breaches.append(f"mean shift {mean_shift:.3f} > {thresholds.max_mean_shift}")
    if variance_shift > thresholds.max_variance_shift:
        breaches.append(f"variance shift {variance_shift:.3f} > {thresholds.max_variance_shift}")
    if centroid_cosine < thresholds.min_centroid_cosine:
        breaches.append(f"centroid cosine {centroid_cosine:.3f} < {thresholds.min_centroid_cosine}")
    summary = (
        f"against {previous_key!r} ({previous.count} vectors): mean shift {mean_shift:.3f}, "
        f"variance shift {variance_shift:.3f}, centroid cosine {centroid_cosine:.3f}"
    )
    return CheckOutcome(
        not breaches,
        ("drifted: " + "; ".join(breaches) + f" ({summary})") if breaches else summary,
        {
            "previous_partition": previous_key,
            "mean_shift": round(mean_shift, 4),
            "variance_shift": round(variance_shift, 4),
            "centroid_cosine": round(centroid_cosine, 4),
            "vectors": current.count,
            "previous_vectors": previous.count,
        },
    )
