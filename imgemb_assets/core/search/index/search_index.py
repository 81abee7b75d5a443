"""The search index in memory (`SearchIndex`): one model's vectors, partition by partition, updated where partitions
changed, and cosine queries over them.

One index holds the vectors of one `model_id` (and so one width), never two:
cosine similarities between vectors of two models mean nothing.

Search is exact (`exact.py`: a matrix product over L2-normalised float32 vectors)
below `DEFAULT_ANN_THRESHOLD` vectors, and approximate above it: a usearch HNSW
graph (`graph.py`: cosine, float16 storage). `python -m bench.search_index` measured
the choice on a 2-core machine, width 2048: exact search takes about 0.75 ms per
1,000 vectors per single query (73 ms p50 at 100,000), with recall 1 and no
build; at 100,000 vectors HNSW answers in 0.6 ms (faiss IVF-Flat 3.4 ms) at
recall@10 1.0 on low-rank clustered vectors, but takes 98 s to build (IVF 8 s)
and about 5 s to replace a partition of 10,000. On isotropic clustered vectors,
a hard case, recall@10 fell to 0.67 (IVF 0.81).

The index is built per partition (`PartitionVectors`): each carries the
fingerprint of the Delta files it was read from, so the caller can tell which
partitions changed and `SearchIndex.update` replaces only those. Saving and
loading it under the lake root: `persistence.py`.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from imgemb_assets.core.search.index.errors import (
    AmbiguousImageId,
    InvalidPartition,
    ModelMismatch,
    SearchIndexError,
    UnknownImageId,
)
from imgemb_assets.core.search.index.exact import allowed_blocks, exact_top_k, exact_top_k_of_blocks
from imgemb_assets.core.search.index.graph import (
    ANN_LIBRARY,
    AnnGraph,
    AnnParameters,
    add_to_graph,
    graph_search,
    new_graph,
)
from imgemb_assets.core.search.index.partitions import IndexedPartition, PartitionVectors


@dataclass(frozen=True)
class Neighbour:
    """One indexed image a query found, and how alike the two are."""

    image_id: str
    prefix: str
    similarity: float  # cosine similarity, 1.0 for the same direction


@dataclass(frozen=True)
class UpdateReport:
    """What a build or an update changed."""

    vectors_added: int
    vectors_removed: int
    partitions_added: tuple[str, ...]
    partitions_replaced: tuple[str, ...]
    partitions_removed: tuple[str, ...]
    vectors_skipped: int  # non-finite or all-zero vectors, which have no direction
    ann_rebuilt: bool  # the whole graph was built (first crossing of the threshold, or too many tombstones)
    seconds: float

    @property
    def partitions_touched(self) -> tuple[str, ...]:
        return self.partitions_added + self.partitions_replaced + self.partitions_removed


@dataclass(frozen=True)
class IndexUpdatePlan:
    """Which partitions to read again and which to drop, from their fingerprints."""

    to_read: tuple[str, ...]  # new or changed partitions
    to_remove: tuple[str, ...]  # indexed partitions that are gone


# Exact search below this many vectors, HNSW at and above it (see the module docstring):
# below it an exact query takes under about 40 ms, exactly and with nothing to build;
# above it exact search grows linearly while HNSW stays near 1 ms.
DEFAULT_ANN_THRESHOLD: Final = 50_000
# Once the graph holds fewer than this fraction of the threshold, exact search is fast
# again: the graph is dropped (a gap between the two, so that one partition coming and
# going does not build and drop the graph each time).
_ANN_DROP_FRACTION: Final = 0.5


class SearchIndex:
    """Cosine-similarity search over one model's vectors, partition by partition.

    `neighbours_of` excludes the vector asked about: it answers "which other
    images look like this one" (the same image_id in another prefix is another
    entry and may be returned).
    """

    def __init__(
        self,
        model_id: str,
        width: int,
        ann_threshold: int = DEFAULT_ANN_THRESHOLD,
        ann_parameters: AnnParameters = AnnParameters(),
    ) -> None:
        if width < 1:
            raise SearchIndexError(f"width must be positive, got {width}")
        self.model_id = model_id
        self.width = width
        self.ann_threshold = ann_threshold
        self.ann_parameters = ann_parameters
        self.build_seconds = 0.0
        self._partitions: dict[str, IndexedPartition] = {}
        self._location_of_key: dict[int, tuple[str, int]] = {}
        self._prefixes_of_id: dict[str, set[str]] = {}
        self._next_key = 0
        self._ann: AnnGraph | None = None
        # What the last save or load saw stored: the index folder, and the rows (live or
        # not) of each segment the manifest names, which compaction weighs.
        self._stored_at: str | None = None
        self._stored_version: str | None = None  # the manifest's version then: what the next save must find
        self._segment_rows: dict[str, int] = {}

    # --- building -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model_id: str,
        width: int,
        partitions: Iterable[PartitionVectors],
        ann_threshold: int = DEFAULT_ANN_THRESHOLD,
        ann_parameters: AnnParameters = AnnParameters(),
    ) -> SearchIndex:
        index = cls(model_id, width, ann_threshold, ann_parameters)
        report = index.update(partitions)
        index.build_seconds = report.seconds
        return index

    def update(self, changed: Iterable[PartitionVectors] = (), removed: Iterable[str] = ()) -> UpdateReport:
        """Replace the vectors of `changed` partitions (adding new ones) and drop `removed` ones.

        Other partitions are left as they are: with a graph, only the replaced
        vectors are removed from and added to it.
        """
        started = time.perf_counter()
        added_parts, replaced_parts, removed_parts = [], [], []
        vectors_added = vectors_removed = skipped = 0
        old_keys: list[np.ndarray] = []
        new_keys: list[np.ndarray] = []
        new_vectors: list[np.ndarray] = []
        # Every partition is checked before any is applied, so a bad one leaves the index as it was.
        changed = list(changed)
        prefixes = [source.prefix for source in changed]
        if len(set(prefixes)) != len(prefixes):
            raise InvalidPartition(f"a prefix is given twice in one update: {sorted(prefixes)}")
        prepared = [(source.prefix, *self._normalised(source)) for source in changed]
        for prefix in dict.fromkeys(removed):
            dropped = self._drop(prefix, old_keys)
            if dropped is not None:
                vectors_removed += dropped
                removed_parts.append(prefix)
        for prefix, partition, skipped_rows in prepared:
            skipped += skipped_rows
            dropped = self._drop(prefix, old_keys)
            if dropped is None:
                added_parts.append(prefix)
            else:
                vectors_removed += dropped
                replaced_parts.append(prefix)
            self._remember(prefix, partition)
            vectors_added += len(partition.keys)
            new_keys.append(partition.keys)
            new_vectors.append(partition.vectors)
        ann_rebuilt = self._update_ann(old_keys, new_keys, new_vectors)
        return UpdateReport(
            vectors_added=vectors_added,
            vectors_removed=vectors_removed,
            partitions_added=tuple(added_parts),
            partitions_replaced=tuple(replaced_parts),
            partitions_removed=tuple(removed_parts),
            vectors_skipped=skipped,
            ann_rebuilt=ann_rebuilt,
            seconds=time.perf_counter() - started,
        )

    def _drop(self, prefix: str, old_keys: list[np.ndarray]) -> int | None:
        """Forget a partition, its keys added to `old_keys` (for the graph); its vector count, None if absent."""
        partition = self._partitions.get(prefix)
        if partition is None:
            return None
        old_keys.append(partition.keys)
        self._forget(prefix)
        return len(partition.keys)

    def plan_update(self, current_fingerprints: Mapping[str, str]) -> IndexUpdatePlan:
        """What to read again given the partitions' fingerprints now (prefix -> fingerprint)."""
        to_read = tuple(
            sorted(
                prefix
                for prefix, fingerprint in current_fingerprints.items()
                if prefix not in self._partitions or self._partitions[prefix].fingerprint != fingerprint
            )
        )
        to_remove = tuple(sorted(set(self._partitions) - set(current_fingerprints)))
        return IndexUpdatePlan(to_read, to_remove)

    def _normalised(self, source: PartitionVectors) -> tuple[IndexedPartition, int]:
        vectors = np.asarray(source.vectors)
        if vectors.size == 0 and len(source.image_ids) == 0:
            # no vectors of this model: kept for its fingerprint, whatever empty shape it came in
            vectors = np.empty((0, self.width), np.float32)
        if vectors.ndim != 2 or (vectors.shape[0] and vectors.shape[1] != self.width):
            raise ModelMismatch(
                f"partition {source.prefix!r} has vectors of shape {vectors.shape}; "
                f"this index holds {self.model_id!r} vectors of width {self.width}"
            )
        image_ids = [str(image_id) for image_id in source.image_ids]
        if len(image_ids) != vectors.shape[0]:
            raise InvalidPartition(
                f"partition {source.prefix!r} has {len(image_ids)} image ids for {vectors.shape[0]} vectors"
            )
        vectors = vectors.astype(np.float32, copy=False).reshape(-1, self.width)
        norms = np.linalg.norm(vectors, axis=1)
        # A vector with no direction (all zero) or a non-finite one has no cosine similarity.
        usable = np.isfinite(norms) & (norms > 0)
        kept_ids = [image_id for image_id, ok in zip(image_ids, usable) if ok]
        row_of_id = {image_id: row for row, image_id in enumerate(kept_ids)}
        if len(row_of_id) != len(kept_ids):
            duplicates = sorted({i for i in kept_ids if kept_ids.count(i) > 1})[:5]
            raise InvalidPartition(f"partition {source.prefix!r} has duplicate image ids, e.g. {duplicates}")
        normalised = vectors[usable] / norms[usable, None]
        keys = np.arange(self._next_key, self._next_key + len(kept_ids), dtype=np.uint64)
        self._next_key += len(kept_ids)
        partition = IndexedPartition(source.fingerprint, keys, kept_ids, np.ascontiguousarray(normalised), row_of_id)
        return partition, int((~usable).sum())

    def _remember(self, prefix: str, partition: IndexedPartition) -> None:
        self._partitions[prefix] = partition
        for row, (key, image_id) in enumerate(zip(partition.keys.tolist(), partition.image_ids)):
            self._location_of_key[key] = (prefix, row)
            self._prefixes_of_id.setdefault(image_id, set()).add(prefix)

    def _forget(self, prefix: str) -> None:
        partition = self._partitions.pop(prefix)
        for key, image_id in zip(partition.keys.tolist(), partition.image_ids):
            del self._location_of_key[key]
            prefixes = self._prefixes_of_id[image_id]
            prefixes.discard(prefix)
            if not prefixes:
                del self._prefixes_of_id[image_id]

    def _update_ann(
        self, old_keys: list[np.ndarray], new_keys: list[np.ndarray], new_vectors: list[np.ndarray]
    ) -> bool:
        """Bring the graph in line with the partitions; whether it was built whole."""
        count = len(self)
        threads = self.ann_parameters.insert_threads
        if self._ann is None:
            if count < self.ann_threshold:
                return False
            self._ann = AnnGraph(new_graph(self.width, self.ann_parameters))
            add_to_graph(self._ann.graph, *self._all_keys_and_vectors(), threads)
            return True
        if count < self.ann_threshold * _ANN_DROP_FRACTION:
            self._ann = None
            return False
        removing = np.concatenate(old_keys) if old_keys else np.empty(0, np.uint64)
        removed_total = self._ann.removed_since_build + len(removing)
        if removed_total > self.ann_parameters.rebuild_after_removed_fraction * max(count, 1):
            self._ann = AnnGraph(new_graph(self.width, self.ann_parameters))
            add_to_graph(self._ann.graph, *self._all_keys_and_vectors(), threads)
            return True
        if len(removing):
            self._ann.graph.remove(removing)
        if new_keys:
            add_to_graph(self._ann.graph, np.concatenate(new_keys), np.concatenate(new_vectors), threads)
        self._ann.removed_since_build = removed_total
        self._ann.file = None
        return False

    def _all_keys_and_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self._partitions.values())
        if not parts:
            return np.empty(0, np.uint64), np.empty((0, self.width), np.float32)
        return np.concatenate([p.keys for p in parts]), np.concatenate([p.vectors for p in parts])

    # --- what it holds --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._location_of_key)

    @property
    def uses_ann(self) -> bool:
        return self._ann is not None

    @property
    def backend(self) -> str:
        return f"{ANN_LIBRARY}-hnsw" if self._ann is not None else "exact"

    def fingerprints(self) -> dict[str, str]:
        return {prefix: partition.fingerprint for prefix, partition in sorted(self._partitions.items())}

    def partition_counts(self) -> dict[str, int]:
        return {prefix: len(partition.keys) for prefix, partition in sorted(self._partitions.items())}

    def partition_vectors(self, prefix: str) -> PartitionVectors:
        """The vectors this index holds for `prefix`, as it holds them: L2-normalised, non-finite ones left out."""
        partition = self._partitions[prefix]
        return PartitionVectors(prefix, partition.fingerprint, list(partition.image_ids), partition.vectors)

    def memory_bytes(self) -> int:
        """Bytes of the vectors held for exact search and lookups, plus the graph's."""
        vectors = sum(partition.vectors.nbytes for partition in self._partitions.values())
        return vectors + (int(self._ann.graph.memory_usage) if self._ann is not None else 0)

    # --- queries --------------------------------------------------------------------

    def vector_of(self, image_id: str, prefix: str | None = None) -> np.ndarray:
        """The indexed (L2-normalised, float32) vector of an image."""
        found_prefix = self._prefix_of(image_id, prefix)
        partition = self._partitions[found_prefix]
        return partition.vectors[partition.row_of_id[image_id]].copy()

    def search(self, queries: np.ndarray, k: int = 10, *, model_id: str | None = None) -> list[list[Neighbour]]:
        """The k most similar indexed vectors to each query, most similar first (exact or HNSW, by size)."""
        normalised = self._normalised_queries(queries, model_id)
        if k < 1 or len(self) == 0:
            return [[] for _ in range(len(normalised))]
        if self._ann is None:
            return self._exact(normalised, k)
        return self._neighbours(graph_search(self._ann.graph, normalised, min(k, len(self))))

    def exact_search(self, queries: np.ndarray, k: int = 10, *, model_id: str | None = None) -> list[list[Neighbour]]:
        """Like `search`, always exact: the reference the graph's recall is measured against."""
        normalised = self._normalised_queries(queries, model_id)
        if k < 1 or len(self) == 0:
            return [[] for _ in range(len(normalised))]
        return self._exact(normalised, k)

    def search_among(
        self,
        queries: np.ndarray,
        allowed: Mapping[str, Collection[str]],
        k: int = 10,
        *,
        model_id: str | None = None,
    ) -> list[list[Neighbour]]:
        """The k most similar to each query among the indexed vectors of `allowed` (prefix -> image_ids), exactly.

        Exact whatever the index's size: the graph cannot be asked for "the nearest among these", and
        asking it for more and more neighbours until k are allowed loses recall exactly when few are. An
        allowed image that is not indexed (in that prefix) is no candidate.
        """
        normalised = self._normalised_queries(queries, model_id)
        if k < 1:
            return [[] for _ in range(len(normalised))]
        return self._neighbours(exact_top_k_of_blocks(allowed_blocks(self._partitions, allowed), normalised, k))

    def count_among(self, allowed: Mapping[str, Collection[str]]) -> int:
        """How many of `allowed` (prefix -> image_ids) are indexed."""
        return sum(len(keys) for keys, _ in allowed_blocks(self._partitions, allowed))

    def neighbours_of(self, image_id: str, k: int = 10, prefix: str | None = None) -> list[Neighbour]:
        """The k indexed vectors most similar to an indexed image's, that image itself excluded."""
        found_prefix = self._prefix_of(image_id, prefix)
        partition = self._partitions[found_prefix]
        row = partition.row_of_id[image_id]
        # one more than asked, as the image itself is (nearly always) among them
        found = self.search(partition.vectors[row][None, :], k + 1)[0]
        others = [n for n in found if not (n.image_id == image_id and n.prefix == found_prefix)]
        return others[:k]

    def _normalised_queries(self, queries: np.ndarray, model_id: str | None) -> np.ndarray:
        if model_id is not None and model_id != self.model_id:
            raise ModelMismatch(f"queries of model {model_id!r} asked of an index of {self.model_id!r}")
        array = np.asarray(queries, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.width:
            raise ModelMismatch(
                f"queries of shape {np.asarray(queries).shape} asked of an index of {self.model_id!r} "
                f"vectors of width {self.width}"
            )
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms) & (norms > 0)):
            raise SearchIndexError("a query vector is all zero or not finite: it has no direction to compare")
        return np.ascontiguousarray(array / norms)

    def _exact(self, queries: np.ndarray, k: int) -> list[list[Neighbour]]:
        return self._neighbours(exact_top_k(self._partitions.values(), queries, k))

    def _neighbours(self, found: list[list[tuple[int, float]]]) -> list[list[Neighbour]]:
        return [[self._neighbour(key, similarity) for key, similarity in row] for row in found]

    def _neighbour(self, key: int, similarity: float) -> Neighbour:
        prefix, row = self._location_of_key[key]
        return Neighbour(self._partitions[prefix].image_ids[row], prefix, similarity)

    def _prefix_of(self, image_id: str, prefix: str | None) -> str:
        prefixes = self._prefixes_of_id.get(image_id, set())
        if prefix is not None:
            if prefix not in prefixes:
                raise UnknownImageId(f"image_id {image_id!r} is not indexed in prefix {prefix!r} ({self.model_id!r})")
            return prefix
        if not prefixes:
            raise UnknownImageId(f"image_id {image_id!r} is not indexed ({self.model_id!r})")
        if len(prefixes) > 1:
            raise AmbiguousImageId(f"image_id {image_id!r} is indexed in prefixes {sorted(prefixes)}: say which prefix")
        return next(iter(prefixes))
