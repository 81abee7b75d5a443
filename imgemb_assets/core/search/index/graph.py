"""The approximate search graph: a usearch HNSW index over the vectors' keys (cosine, float16 storage), its settings
(`AnnParameters`), building and adding to it, and what a search of it returns.

usearch rather than faiss IVF (`python -m bench.search_index`): 6x lower latency, no
training step (IVF's centroids, trained once, go stale as partitions are replaced), and
removal by key; IVF builds faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from usearch.index import Index as UsearchIndex

ANN_LIBRARY: Final = "usearch"
# The folder of a saved index's graph files, under the index folder.
GRAPH_FOLDER: Final = "ann"


@dataclass(frozen=True)
class AnnParameters:
    """usearch HNSW settings; measured by `bench.search_index` (recall@10 1.0 on low-rank clustered vectors)."""

    connectivity: int = 16
    expansion_add: int = 64
    expansion_search: int = 64
    dtype: str = "f16"  # half the memory of f32 with no measurable recall loss; i8 lost recall
    # Removed vectors stay in the graph as tombstones; past this fraction of the live
    # vectors the graph is rebuilt, so that searches do not wade through them.
    rebuild_after_removed_fraction: float = 0.5
    # Threads inserting into the graph: 0 is every core. Concurrent insertion makes the
    # graph depend on thread timing; 1 gives the same graph for the same insertions.
    insert_threads: int = 0


@dataclass
class AnnGraph:
    """An index's graph, the removals since it was built whole, and the file that holds it."""

    graph: UsearchIndex
    removed_since_build: int = 0
    file: str | None = None  # None until saved (or after any change)


def new_graph(width: int, parameters: AnnParameters) -> UsearchIndex:
    return UsearchIndex(
        ndim=width,
        metric="cos",
        dtype=parameters.dtype,
        connectivity=parameters.connectivity,
        expansion_add=parameters.expansion_add,
        expansion_search=parameters.expansion_search,
    )


def add_to_graph(graph: UsearchIndex, keys: np.ndarray, vectors: np.ndarray, threads: int) -> None:
    if len(keys):
        graph.add(keys, vectors, threads=threads)


def graph_search(graph: UsearchIndex, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per query (L2-normalised rows), the keys the graph finds nearest with their cosine similarities, best first."""
    matches = graph.search(queries, k, threads=0)
    # usearch answers one query with Matches (1-D, valid rows only), several with BatchMatches
    if matches.keys.ndim == 1:
        rows = [(matches.keys.tolist(), matches.distances.tolist())]
    else:
        counts = matches.counts  # type: ignore[union-attr]  # 2-D keys: a BatchMatches
        rows = [
            (matches.keys[row][:count].tolist(), matches.distances[row][:count].tolist())
            for row, count in enumerate(counts.tolist())
        ]
    # usearch's cosine distance is 1 - similarity
    return [[(key, 1.0 - distance) for key, distance in zip(keys, distances)] for keys, distances in rows]


def usearch_version() -> str:
    import usearch

    return str(usearch.__version__)
