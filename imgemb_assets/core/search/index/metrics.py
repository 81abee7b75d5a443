"""The numbers an asset reports about a search index: recall@k of its search against exact search (`recall_at_k`),
and its size, backend, build time and memory (`index_metadata`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from imgemb_assets.core.search.index.search_index import SearchIndex


def recall_at_k(index: SearchIndex, k: int = 10, sample_size: int = 200, seed: int = 0) -> float:
    """Mean fraction of the exact top k that `search` finds, over a sample of indexed vectors as queries.

    1.0 for an exact index (it is the exact search); the graph's quality otherwise.
    """
    keys = np.fromiter(index._location_of_key, dtype=np.int64, count=len(index))
    if len(keys) == 0:
        return 1.0
    chosen = np.random.default_rng(seed).choice(keys, size=min(sample_size, len(keys)), replace=False)
    queries = np.stack([_vector_of_key(index, int(key)) for key in chosen])
    found = index.search(queries, k)
    exact = index.exact_search(queries, k)
    overlaps = [
        len({(n.prefix, n.image_id) for n in approx} & {(n.prefix, n.image_id) for n in truth}) / max(len(truth), 1)
        for approx, truth in zip(found, exact)
    ]
    return float(np.mean(overlaps))


def _vector_of_key(index: SearchIndex, key: int) -> np.ndarray:
    prefix, row = index._location_of_key[key]
    return index._partitions[prefix].vectors[row]


def index_metadata(index: SearchIndex, recall_sample: int = 200) -> dict[str, Any]:
    """Numbers an asset reports: size, backend, build seconds, bytes in memory, recall@10 against exact search."""
    return {
        "model_id": index.model_id,
        "width": index.width,
        "vectors_indexed": len(index),
        "partitions": len(index.fingerprints()),
        "backend": index.backend,
        "ann_threshold": index.ann_threshold,
        "build_seconds": round(index.build_seconds, 3),
        "index_bytes": index.memory_bytes(),
        "recall_at_10": round(recall_at_k(index, 10, recall_sample), 4),
    }
