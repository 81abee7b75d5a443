"""Helpers the evaluation's scores share: float64 row norms a bounded block at a time, and how a score is shown."""

from __future__ import annotations

from typing import Final

import numpy as np

# Rows converted to float64 at once: 1024 x 2048 x 8 bytes = 16 MiB.
ROWS_AT_ONCE: Final = 1024


def row_norms(vectors: np.ndarray) -> np.ndarray:
    """Euclidean length of each row, in float64 so large float32 values do not overflow."""
    norms = np.empty(len(vectors))
    for start in range(0, len(vectors), ROWS_AT_ONCE):
        norms[start : start + ROWS_AT_ONCE] = np.linalg.norm(
            vectors[start : start + ROWS_AT_ONCE].astype(np.float64), axis=1
        )
    return norms


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
