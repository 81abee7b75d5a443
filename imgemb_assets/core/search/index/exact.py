"""Exact search: the k best cosine similarities of each query against every held vector, a matrix product over
L2-normalised float32 vectors taken block by block, so a batch of queries never makes a (queries x all vectors)
matrix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import numpy as np

from imgemb_assets.core.search.index.partitions import IndexedPartition

# Similarities from an exact search of a block of this many vectors at a time.
_EXACT_BLOCK_ROWS: Final = 16_384


def exact_top_k(partitions: Iterable[IndexedPartition], queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per query (L2-normalised rows), the keys of its k most similar vectors with their similarities, best first.

    Ties keep a stable order: by similarity, then by key (insertion order).
    """
    # The best k of each block, then the best k of those: never all similarities at once.
    best_keys: list[np.ndarray] = []
    best_scores: list[np.ndarray] = []
    for partition in partitions:
        for start in range(0, len(partition.keys), _EXACT_BLOCK_ROWS):
            block = partition.vectors[start : start + _EXACT_BLOCK_ROWS]
            scores = queries @ block.T  # (queries, rows)
            take = min(k, scores.shape[1])
            top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
            best_scores.append(np.take_along_axis(scores, top, axis=1))
            best_keys.append(partition.keys[start : start + _EXACT_BLOCK_ROWS][top])
    scores = np.concatenate(best_scores, axis=1)
    keys = np.concatenate(best_keys, axis=1)
    results = []
    for row in range(len(queries)):
        order = np.lexsort((keys[row], -scores[row]))[:k]
        results.append([(int(keys[row][i]), float(scores[row][i])) for i in order])
    return results
