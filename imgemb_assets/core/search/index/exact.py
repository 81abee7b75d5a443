"""Exact search: the k best cosine similarities of each query against every held vector, a matrix product over
L2-normalised float32 vectors taken block by block, so a batch of queries never makes a (queries x all vectors)
matrix."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Final

import numpy as np

from imgemb_assets.core.search.index.partitions import IndexedPartition

# Similarities from an exact search of a block of this many vectors at a time.
_EXACT_BLOCK_ROWS: Final = 16_384


def exact_top_k(partitions: Iterable[IndexedPartition], queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per query (L2-normalised rows), the keys of its k most similar vectors with their similarities, best first.

    Ties keep a stable order: by similarity, then by key (insertion order).
    """
    return exact_top_k_of_blocks((block for p in partitions for block in blocks_of(p.keys, p.vectors)), queries, k)


def exact_top_k_of_blocks(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int
) -> list[list[tuple[int, float]]]:
    """As `exact_top_k`, among the (keys, vectors) blocks given: every query gets no answer when they hold none."""
    # The best k of each block, then the best k of those: never all similarities at once.
    best_keys: list[np.ndarray] = []
    best_scores: list[np.ndarray] = []
    for block_keys, block in blocks:
        if not len(block_keys):
            continue
        scores = queries @ block.T  # (queries, rows)
        take = min(k, scores.shape[1])
        top = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        best_scores.append(np.take_along_axis(scores, top, axis=1))
        best_keys.append(block_keys[top])
    if not best_keys:
        return [[] for _ in range(len(queries))]
    scores = np.concatenate(best_scores, axis=1)
    keys = np.concatenate(best_keys, axis=1)
    results = []
    for row in range(len(queries)):
        order = np.lexsort((keys[row], -scores[row]))[:k]
        results.append([(int(keys[row][i]), float(scores[row][i])) for i in order])
    return results


def allowed_blocks(
    partitions: Mapping[str, IndexedPartition], allowed: Mapping[str, Collection[str]]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, vectors) of the held rows `allowed` names (prefix -> image_ids), a block at a time, in insertion order.

    An allowed image that is not held (in that prefix) is left out.
    """
    for prefix, partition in partitions.items():
        image_ids = allowed.get(prefix)
        if not image_ids:
            continue
        rows = np.array(sorted(partition.row_of_id[i] for i in image_ids if i in partition.row_of_id), np.int64)
        if len(rows) == len(partition.keys):  # the whole partition: its arrays as they are, no copy
            yield from blocks_of(partition.keys, partition.vectors)
            continue
        for start in range(0, len(rows), _EXACT_BLOCK_ROWS):
            chosen = rows[start : start + _EXACT_BLOCK_ROWS]
            yield partition.keys[chosen], partition.vectors[chosen]


def blocks_of(keys: np.ndarray, vectors: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Keys and vectors `_EXACT_BLOCK_ROWS` at a time."""
    for start in range(0, len(keys), _EXACT_BLOCK_ROWS):
        yield keys[start : start + _EXACT_BLOCK_ROWS], vectors[start : start + _EXACT_BLOCK_ROWS]
