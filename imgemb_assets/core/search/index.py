"""A similar-image search index over one model's embeddings, kept beside the Delta tables.

One index holds the vectors of one `model_id` (and so one width), never two:
cosine similarities between vectors of two models mean nothing.

Search is exact (a matrix product over L2-normalised float32 vectors) below
`DEFAULT_ANN_THRESHOLD` vectors, and approximate above it: a usearch HNSW
graph (cosine, float16 storage). `python -m bench.search_index` measured the
choice on a 2-core machine, width 2048: exact search takes about 0.75 ms per
1,000 vectors per single query (73 ms p50 at 100,000), with recall 1 and no
build; at 100,000 vectors HNSW answers in 0.6 ms (faiss IVF-Flat 3.4 ms) at
recall@10 1.0 on low-rank clustered vectors, but takes 98 s to build (IVF 8 s)
and about 5 s to replace a partition of 10,000. On isotropic clustered vectors,
a hard case, recall@10 fell to 0.67 (IVF 0.81). usearch rather than faiss IVF:
6x lower latency, no training step (IVF's centroids, trained once, go stale as
partitions are replaced), and removal by key; IVF builds faster.

The index is built per partition (`PartitionVectors`): each carries the
fingerprint of the Delta files it was read from, so the caller can tell which
partitions changed and `SearchIndex.update` replaces only those.

Persistence: `<lake root>/_search_index/<model>/` holds `manifest.json` (what
the index holds, which files) and the data files, through `pyarrow.fs`, so a
local root and an `s3://` root work alike. Catalogues reach 10,000 partitions of
a few to a few hundred images, so the vectors are not kept one file per
partition (10,000 GETs a load, thousands of PUTs a backfill): each save writes
at most one parquet *segment*, holding the rows of every partition changed
since the last save or load, and the manifest maps each prefix to (segment,
count, fingerprint). A partition with no vectors of this model has no segment:
only its fingerprint, so the caller knows it was looked at. A load reads each
segment named once and keeps the rows of the prefixes the manifest maps to it
(older versions of a prefix stay in older segments until those are compacted).
Compaction: when fewer than half the rows of the named segments would be live,
or there would be more than `_MAX_SEGMENTS`, the save writes all live rows into
one segment instead; so a load reads at most twice the live rows, from at most
32 segments, the manifest and the graph. `python -m bench.search_index --only
persistence` measured 10,000 partitions of 10 vectors of width 2048 on a local
folder (2 cores): a full save 2.0-2.6 s and 1 file (one file per partition:
18.8 s, 10,000 files), a load 2.1-2.7 s and 2 files (14.4 s, 10,001 files), a
save after 10 partitions changed 0.06 s and 1 file (0.16 s, 10 written and 10
deleted); on the moto S3 server, 1,000 partitions: load 1.4 s against 15.9 s.
New files get new names and the manifest is written last, compare-and-swap
(`core/storage/conditional_write.py`), so a reader never sees a manifest naming a file
that is not complete and two writers never both commit from one load. The files
a manifest stops naming are retired (listed in it) and deleted by a later save
after `RETIRED_GRACE_S`, so a reader of the previous manifest still finds them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from usearch.index import Index as UsearchIndex

from imgemb_assets.core.lake.embedding_column import vectors_of
from imgemb_assets.core.lake.lake import Lake, partition_value
from imgemb_assets.core.lake.tables import IMAGE_EMBEDDINGS
from imgemb_assets.core.storage.arrow_filesystem import ArrowLocation, UnsupportedLocation, arrow_location
from imgemb_assets.core.storage.conditional_write import ConcurrentWrite, read_versioned, write_if_unchanged
from imgemb_assets.core.storage.objects import local_path_of

INDEX_FOLDER: Final = "_search_index"
MANIFEST_NAME: Final = "manifest.json"
# 2: segments holding many partitions (1: one parquet file per partition).
FORMAT_VERSION: Final = 2
# Exact search below this many vectors, HNSW at and above it (see the module docstring):
# below it an exact query takes under about 40 ms, exactly and with nothing to build;
# above it exact search grows linearly while HNSW stays near 1 ms.
DEFAULT_ANN_THRESHOLD: Final = 50_000
# Once the graph holds fewer than this fraction of the threshold, exact search is fast
# again: the graph is dropped (a gap between the two, so that one partition coming and
# going does not build and drop the graph each time).
_ANN_DROP_FRACTION: Final = 0.5
# Similarities from an exact search of a block of this many vectors at a time, so a
# batch of queries never makes a (queries x all vectors) matrix.
_EXACT_BLOCK_ROWS: Final = 16_384
_ANN_LIBRARY: Final = "usearch"
# Compaction (see the module docstring): a save rewrites every live row into one segment
# when the named segments would number more than this, or hold fewer live rows than
# this fraction of their rows. Both bound what a load reads: files, and wasted bytes.
_MAX_SEGMENTS: Final = 32
_COMPACT_BELOW_LIVE_FRACTION: Final = 0.5
# Rows of a segment are written in parquet row groups of about this many bytes of vectors
# (whole partitions each), so neither a save nor a load holds a second copy of every vector.
_SEGMENT_ROW_GROUP_BYTES: Final = 32 * 2**20
_SEGMENT_COLUMNS: Final = ("prefix", "key", "image_id", "vector")
# The folders of an index's data files, under its folder.
_SEGMENTS: Final = "segments"
_GRAPHS: Final = "ann"
# How long a file the manifest stopped naming (and an orphan) is kept before a save deletes it:
# a reader that read the previous manifest has this long to read the files it names.
RETIRED_GRACE_S: float = 3600.0
# A load that finds a named file gone re-reads the manifest (a save retired it past the grace
# meanwhile) at most this many times.
_LOAD_ATTEMPTS: Final = 3


class SearchIndexError(Exception):
    """The search index cannot do what was asked; the message says why."""


class UnknownImageId(SearchIndexError, KeyError):
    """No indexed vector has this image_id (in this prefix, when one was given)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class AmbiguousImageId(SearchIndexError):
    """The image_id is indexed in several prefixes and no prefix was given."""


class IndexMissing(SearchIndexError):
    """No index was written for this model under this lake root."""


class ModelMismatch(SearchIndexError):
    """The vectors, queries or stored index belong to another model_id or width."""


class InvalidPartition(SearchIndexError):
    """A partition's ids and vectors do not fit together (count, duplicates, shape)."""


class IndexCommitConflict(SearchIndexError):
    """Another writer saved this model's index after this one loaded it: this save wrote nothing that counts."""


@dataclass(frozen=True)
class PartitionVectors:
    """One partition's vectors of one model: row i of `vectors` is the embedding of `image_ids[i]`."""

    prefix: str
    fingerprint: str  # opaque; changes whenever the partition's Delta files change
    image_ids: Sequence[str]
    vectors: np.ndarray  # (N, width), any float dtype; normalised by the index


@dataclass(frozen=True)
class Neighbour:
    image_id: str
    prefix: str
    similarity: float  # cosine similarity, 1.0 for the same direction


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


@dataclass(frozen=True)
class SaveReport:
    files_written: int
    files_deleted: int
    bytes_written: int
    seconds: float


@dataclass
class _Partition:
    fingerprint: str
    keys: np.ndarray  # uint64, the ANN keys of the rows
    image_ids: list[str]
    vectors: np.ndarray  # (N, width) float32, L2-normalised
    row_of_id: dict[str, int]
    # the segment (under the index folder) holding its rows, as the stored manifest says;
    # None until saved, and always None for a partition with no vectors (it has no rows)
    segment: str | None = None


@dataclass
class _Ann:
    graph: UsearchIndex
    removed_since_build: int = 0
    file: str | None = None  # None until saved (or after any change)


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
        self._partitions: dict[str, _Partition] = {}
        self._location_of_key: dict[int, tuple[str, int]] = {}
        self._prefixes_of_id: dict[str, set[str]] = {}
        self._next_key = 0
        self._ann: _Ann | None = None
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

    def _normalised(self, source: PartitionVectors) -> tuple[_Partition, int]:
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
        partition = _Partition(source.fingerprint, keys, kept_ids, np.ascontiguousarray(normalised), row_of_id)
        return partition, int((~usable).sum())

    def _remember(self, prefix: str, partition: _Partition) -> None:
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
        if self._ann is None:
            if count < self.ann_threshold:
                return False
            self._ann = _Ann(self._new_graph())
            self._add_to_graph(self._ann.graph, *self._all_keys_and_vectors())
            return True
        if count < self.ann_threshold * _ANN_DROP_FRACTION:
            self._ann = None
            return False
        removing = np.concatenate(old_keys) if old_keys else np.empty(0, np.uint64)
        removed_total = self._ann.removed_since_build + len(removing)
        if removed_total > self.ann_parameters.rebuild_after_removed_fraction * max(count, 1):
            self._ann = _Ann(self._new_graph())
            self._add_to_graph(self._ann.graph, *self._all_keys_and_vectors())
            return True
        if len(removing):
            self._ann.graph.remove(removing)
        if new_keys:
            self._add_to_graph(self._ann.graph, np.concatenate(new_keys), np.concatenate(new_vectors))
        self._ann.removed_since_build = removed_total
        self._ann.file = None
        return False

    def _new_graph(self) -> UsearchIndex:
        parameters = self.ann_parameters
        return UsearchIndex(
            ndim=self.width,
            metric="cos",
            dtype=parameters.dtype,
            connectivity=parameters.connectivity,
            expansion_add=parameters.expansion_add,
            expansion_search=parameters.expansion_search,
        )

    def _add_to_graph(self, graph: UsearchIndex, keys: np.ndarray, vectors: np.ndarray) -> None:
        if len(keys):
            graph.add(keys, vectors, threads=self.ann_parameters.insert_threads)

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
        return f"{_ANN_LIBRARY}-hnsw" if self._ann is not None else "exact"

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
        matches = self._ann.graph.search(normalised, min(k, len(self)), threads=0)
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
        return [
            [self._neighbour(key, 1.0 - distance) for key, distance in zip(keys, distances)] for keys, distances in rows
        ]

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
        return self._exact(normalised, k, self._allowed_blocks(allowed))

    def count_among(self, allowed: Mapping[str, Collection[str]]) -> int:
        """How many of `allowed` (prefix -> image_ids) are indexed."""
        return sum(len(keys) for keys, _ in self._allowed_blocks(allowed))

    def _allowed_blocks(self, allowed: Mapping[str, Collection[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, vectors) of the allowed indexed rows, at most `_EXACT_BLOCK_ROWS` at a time, in insertion order."""
        for prefix, partition in self._partitions.items():
            image_ids = allowed.get(prefix)
            if not image_ids:
                continue
            rows = np.array(sorted(partition.row_of_id[i] for i in image_ids if i in partition.row_of_id), np.int64)
            if len(rows) == len(partition.keys):  # the whole partition: its arrays as they are, no copy
                yield from _blocks_of(partition.keys, partition.vectors)
                continue
            for start in range(0, len(rows), _EXACT_BLOCK_ROWS):
                chosen = rows[start : start + _EXACT_BLOCK_ROWS]
                yield partition.keys[chosen], partition.vectors[chosen]

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

    def _exact(
        self, queries: np.ndarray, k: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]] | None = None
    ) -> list[list[Neighbour]]:
        """The k best of `blocks` ((keys, vectors) pairs; every indexed vector when None) for each query."""
        # The best k of each block, then the best k of those: never all similarities at once.
        best_keys: list[np.ndarray] = []
        best_scores: list[np.ndarray] = []
        if blocks is None:
            blocks = (block for p in self._partitions.values() for block in _blocks_of(p.keys, p.vectors))
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
        # stable order on ties: by similarity, then by key (insertion order)
        results = []
        for row in range(len(queries)):
            order = np.lexsort((keys[row], -scores[row]))[:k]
            results.append([self._neighbour(int(keys[row][i]), float(scores[row][i])) for i in order])
        return results

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


def _blocks_of(keys: np.ndarray, vectors: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(keys), _EXACT_BLOCK_ROWS):
        yield keys[start : start + _EXACT_BLOCK_ROWS], vectors[start : start + _EXACT_BLOCK_ROWS]


# --- what the caller reports -------------------------------------------------------


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


# --- reading partitions from the lake ---------------------------------------------


def read_partition_models(
    lake: Lake, prefix: str, fingerprint: str, table: str = IMAGE_EMBEDDINGS
) -> dict[str, PartitionVectors]:
    """One partition's vectors, per model that wrote some, each with `fingerprint`.

    Take the fingerprint (`Lake.partition_fingerprints`) before reading: a rewrite
    in between leaves an old fingerprint, so the next update reads the partition
    again (never the reverse).
    """
    rows = lake.read(table, prefix, columns=["image_id", "model_id", "embedding"])
    found: dict[str, PartitionVectors] = {}
    for model_id in sorted(set(rows.column("model_id").to_pylist())):
        of_model = rows.filter(pc.equal(rows.column("model_id"), model_id))
        found[model_id] = PartitionVectors(
            prefix, fingerprint, of_model.column("image_id").to_pylist(), vectors_of(of_model.column("embedding"))
        )
    return found


# --- persistence under the lake root -----------------------------------------------


# An index folder: the lake's pyarrow filesystem (local or S3) and the folder's path on it.
_IndexFolder = ArrowLocation


def index_folder_uri(lake: Lake, model_id: str) -> str:
    """Where the index of `model_id` lives: `<lake root>/_search_index/<safe model name>`."""
    return f"{_index_root_uri(lake)}/{_safe_name(model_id)}"


def _index_root_uri(lake: Lake) -> str:
    local = local_path_of(lake.root_uri)
    root = str(local.resolve()) if local is not None else lake.root_uri.rstrip("/")
    return f"{root}/{INDEX_FOLDER}"


def index_root(lake: Lake) -> _IndexFolder:
    """The folder holding every model's index folder (and the refresh journal), with a filesystem that reaches it."""
    return _folder_at(_index_root_uri(lake), lake)


def _safe_name(model_id: str) -> str:
    # The lake's own rule for partition folders: readable when plain, stem and hash otherwise.
    return partition_value(model_id)


def _index_folder(lake: Lake, model_id: str) -> _IndexFolder:
    return _folder_at(index_folder_uri(lake, model_id), lake)


def _folder_at(uri: str, lake: Lake) -> _IndexFolder:
    """The folder at `uri` (the lake's index root or under it), with a filesystem that reaches it."""
    try:
        return arrow_location(uri, lake.current_storage_options())
    except UnsupportedLocation as exc:
        raise SearchIndexError(f"lake root {lake.root_uri!r}: only a local folder or s3:// is supported") from exc


def save_index(index: SearchIndex, lake: Lake) -> SaveReport:
    """Write the index under the lake root: new files first, then the manifest (the commit), then clean up.

    At most one new segment (the partitions changed since the last save or load,
    or every live row when compacting) and the graph when it changed. The
    manifest is written only if it is still the one this index was loaded from
    (compare-and-swap, `core/storage/conditional_write.py`); an index not loaded from
    this folder replaces whatever manifest it finds there. When another writer
    saved in between, the save deletes its own new files and raises
    IndexCommitConflict: load again and redo the update.

    Files the new manifest no longer names are not deleted at once: the manifest
    lists them as retired, and a save deletes them once they have been retired
    for `RETIRED_GRACE_S`, so a reader that read the previous manifest still
    finds every file it names. The same save deletes orphans (files of a save
    that died before its manifest) older than the grace.
    """
    started = time.perf_counter()
    folder = _index_folder(lake, index.model_id)
    location = index_folder_uri(lake, index.model_id)
    loaded_here = index._stored_at == location
    if not loaded_here:
        # the segments it knows are in another folder (or none): this folder gets everything
        _forget_stored_files(index)
    stored = read_versioned(folder, MANIFEST_NAME)
    if loaded_here and stored.version != index._stored_version:
        raise IndexCommitConflict(_conflict_message(location))
    previous = _parsed_manifest_or_none(stored.body)
    if folder.is_local:
        folder.filesystem.create_dir(folder.path, recursive=True)
    plan = _plan_segment(index)
    new_files: list[str] = []
    bytes_written = 0
    segment_of = {prefix: partition.segment for prefix, partition in index._partitions.items()}
    segment_rows = dict(index._segment_rows)
    graph_file = index._ann.file if index._ann is not None else None
    try:
        if plan.prefixes:
            name = f"{_SEGMENTS}/{uuid.uuid4().hex}.parquet"
            new_files.append(name)
            bytes_written += _write_segment(
                folder, name, [(prefix, index._partitions[prefix]) for prefix in plan.prefixes]
            )
            segment_of.update((prefix, name) for prefix in plan.prefixes)
            segment_rows[name] = plan.rows
        if index._ann is not None and graph_file is None:
            graph_file = f"{_GRAPHS}/{uuid.uuid4().hex}.usearch"
            new_files.append(graph_file)
            bytes_written += _write_graph_file(folder, graph_file, index._ann.graph)
        named = set(segment_of.values()) - {None}
        segment_rows = {name: rows for name, rows in segment_rows.items() if name in named}
        now = time.time()
        manifest = _manifest_of(index, segment_of, segment_rows, graph_file)
        retired = _retired_after(previous, set(_files_named(manifest)), now)
        expired = sorted(name for name, at in retired.items() if now - at >= RETIRED_GRACE_S)
        manifest["retired"] = {name: at for name, at in sorted(retired.items()) if name not in expired}
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode("utf-8")
        try:
            version = write_if_unchanged(folder, MANIFEST_NAME, body, stored.version)
        except ConcurrentWrite as conflict:
            raise IndexCommitConflict(_conflict_message(location)) from conflict
    except BaseException:
        # nothing names them: a failed or refused save leaves no file behind (a kill leaves orphans)
        _delete_quietly(folder, new_files)
        raise
    # Stored: only now does the index take the names on (a failed write leaves it to write them again).
    for prefix, partition in index._partitions.items():
        partition.segment = segment_of[prefix]
    if index._ann is not None:
        index._ann.file = graph_file
    index._segment_rows = segment_rows
    index._stored_at = location
    index._stored_version = version
    deleted = _delete_quietly(folder, expired)
    deleted += _delete_orphans(folder, set(_files_named(manifest)) | set(manifest["retired"]), now)
    return SaveReport(len(new_files), deleted, bytes_written, time.perf_counter() - started)


def _conflict_message(location: str) -> str:
    return f"the search index at {location} was saved by another writer since this one loaded it; load it again"


def _retired_after(previous: Mapping[str, Any] | None, still_named: set[str], now: float) -> dict[str, float]:
    """The previous manifest's retired files, with the files it named that the new manifest does not."""
    retired: dict[str, float] = {}
    if previous is not None:
        retired.update((name, float(at)) for name, at in dict(previous.get("retired") or {}).items())
        retired.update((name, now) for name in _files_named(previous) if name not in retired)
    return {name: at for name, at in retired.items() if name not in still_named}


def _delete_quietly(folder: _IndexFolder, names: Iterable[str]) -> int:
    """Delete what it can; a file left behind is an orphan a later save deletes. How many were deleted."""
    deleted = 0
    for name in names:
        try:
            folder.filesystem.delete_file(folder.file(name))
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError:
            continue
    return deleted


def _delete_orphans(folder: _IndexFolder, kept: set[str], now: float) -> int:
    """Delete the data files (and local scratch manifests) nothing names, once older than the grace.

    They come from saves that died between writing their files and their
    manifest. The age spares the files of a save still under way.
    """
    listed: list[pafs.FileInfo] = []
    for sub in (_SEGMENTS, _GRAPHS):
        listed += folder.filesystem.get_file_info(pafs.FileSelector(folder.file(sub), allow_not_found=True))
    if folder.is_local:
        top = folder.filesystem.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
        listed += [
            info
            for info in top
            if info.base_name.startswith(f".{MANIFEST_NAME}.") and not info.base_name.endswith(".lock")
        ]
    orphans = []
    for info in listed:
        if info.type != pafs.FileType.File:
            continue
        name = info.path[len(folder.path) + 1 :]
        modified = info.mtime.timestamp() if info.mtime is not None else now
        if name not in kept and now - modified >= RETIRED_GRACE_S:
            orphans.append(name)
    return _delete_quietly(folder, orphans)


def _forget_stored_files(index: SearchIndex) -> None:
    for partition in index._partitions.values():
        partition.segment = None
    if index._ann is not None:
        index._ann.file = None
    index._segment_rows = {}


@dataclass(frozen=True)
class _SegmentPlan:
    prefixes: tuple[str, ...]  # the partitions whose rows the new segment holds; empty: no new segment
    rows: int
    compacting: bool


def _plan_segment(index: SearchIndex) -> _SegmentPlan:
    """What the save's one new segment holds: the changed partitions, or every live row (compaction)."""
    stored = [(prefix, partition) for prefix, partition in sorted(index._partitions.items()) if len(partition.keys)]
    changed = [prefix for prefix, partition in stored if partition.segment is None]
    changed_rows = sum(len(index._partitions[prefix].keys) for prefix in changed)
    live: Counter[str] = Counter()
    for _, partition in stored:
        if partition.segment is not None:
            live[partition.segment] += len(partition.keys)
    # weighed over the segments the new manifest would name, the new one (all live) included
    segments = len(live) + (1 if changed else 0)
    live_rows = sum(live.values()) + changed_rows
    total_rows = sum(index._segment_rows.get(name, rows) for name, rows in live.items()) + changed_rows
    if segments > _MAX_SEGMENTS or live_rows < _COMPACT_BELOW_LIVE_FRACTION * total_rows:
        return _SegmentPlan(tuple(prefix for prefix, _ in stored), live_rows, True)
    return _SegmentPlan(tuple(changed), changed_rows, False)


def load_index(lake: Lake, model_id: str, width: int | None = None) -> SearchIndex:
    """The index of `model_id` saved under the lake root; IndexMissing when there is none.

    Reads the manifest, each segment it names once, and the graph: a bounded
    number of files however many partitions there are. Damage (a manifest or a
    file that cannot be read as what it should be) is a SearchIndexError that
    names the file; a named file that is gone is looked for again under a newer
    manifest, in case a save retired it meanwhile.
    """
    folder = _index_folder(lake, model_id)
    location = index_folder_uri(lake, model_id)
    for attempt in range(_LOAD_ATTEMPTS):
        stored = read_versioned(folder, MANIFEST_NAME)
        if stored.body is None:
            raise IndexMissing(f"no search index for model {model_id!r} at {location}")
        manifest = _parsed_manifest(stored.body, folder.file(MANIFEST_NAME))
        try:
            index = _index_from_manifest(folder, location, manifest, model_id, width)
        except _NamedFileMissing as missing:
            if attempt + 1 < _LOAD_ATTEMPTS and read_versioned(folder, MANIFEST_NAME).version != stored.version:
                continue
            raise SearchIndexError(
                f"{folder.file(missing.name)}, named by {folder.file(MANIFEST_NAME)}, is missing"
            ) from missing
        index._stored_version = stored.version
        return index
    raise AssertionError("unreachable: the last attempt returns or raises")


class _NamedFileMissing(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _index_from_manifest(
    folder: _IndexFolder, location: str, manifest: Mapping[str, Any], model_id: str, width: int | None
) -> SearchIndex:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SearchIndexError(
            f"search index format {manifest.get('format_version')!r} at {location}; "
            f"this code reads {FORMAT_VERSION}: build it again"
        )
    _check_manifest_shape(manifest, folder.file(MANIFEST_NAME))
    if manifest["model_id"] != model_id or (width is not None and manifest["width"] != width):
        raise ModelMismatch(
            f"the index at {location} holds {manifest['model_id']!r} vectors of width "
            f"{manifest['width']}, not {model_id!r}" + (f" of width {width}" if width is not None else "")
        )
    ann = manifest["ann"]
    index = SearchIndex(model_id, manifest["width"], manifest["ann_threshold"], AnnParameters(**ann["parameters"]))
    index.build_seconds = manifest["build_seconds"]
    index._next_key = manifest["next_key"]
    entries: dict[str, dict[str, Any]] = manifest["partitions"]
    segment_rows: dict[str, int] = manifest["segments"]
    wanted: dict[str, set[str]] = {}
    for prefix, entry in entries.items():
        if entry["segment"] is not None:
            if entry["segment"] not in segment_rows:
                raise SearchIndexError(f"the manifest at {location} maps {prefix!r} to a segment it does not list")
            wanted.setdefault(entry["segment"], set()).add(prefix)
    rows: dict[str, _Rows] = {}
    for name in sorted(wanted):
        rows.update(_read_segment(folder, name, index.width, wanted[name]))
    for prefix, entry in sorted(entries.items()):
        partition = _partition_of(rows.pop(prefix, None), index.width, entry["fingerprint"], entry["segment"])
        if len(partition.keys) != entry["count"]:
            raise SearchIndexError(
                f"{folder.file(str(entry['segment']))} holds {len(partition.keys)} vectors of {prefix!r}, "
                f"the manifest says {entry['count']}"
            )
        index._remember(prefix, partition)
    if ann["file"] is not None:
        index._ann = _Ann(_read_graph_file(folder, ann["file"]), ann["removed_since_build"], ann["file"])
    index._segment_rows = dict(segment_rows)
    index._stored_at = location
    return index


# The manifest's keys a load reads, with their types (partition entries are checked one by one).
_MANIFEST_KEYS: Final[dict[str, type | tuple[type, ...]]] = {
    "model_id": str, "width": int, "next_key": int, "ann_threshold": int, "build_seconds": (int, float),
    "ann": dict, "segments": dict, "partitions": dict,
}  # fmt: skip


def _check_manifest_shape(manifest: Mapping[str, Any], file: str) -> None:
    """SearchIndexError naming the file for a manifest whose keys a load reads are missing or of the wrong type."""
    problems = [key for key, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    ann = manifest.get("ann")
    if isinstance(ann, dict) and not (
        isinstance(ann.get("parameters"), dict) and "file" in ann and "removed_since_build" in ann
    ):
        problems.append("ann")
    partitions = manifest.get("partitions")
    if isinstance(partitions, dict) and not all(
        isinstance(entry, dict) and {"segment", "count", "fingerprint"} <= entry.keys() for entry in partitions.values()
    ):
        problems.append("partitions")
    if problems:
        raise SearchIndexError(
            f"{file} is not a readable manifest: {', '.join(sorted(set(problems)))} missing or malformed"
        )


def _manifest_of(
    index: SearchIndex, segment_of: Mapping[str, str | None], segment_rows: Mapping[str, int], graph_file: str | None
) -> dict[str, Any]:
    ann = index._ann
    return {
        "format_version": FORMAT_VERSION,
        "model_id": index.model_id,
        "width": index.width,
        "metric": "cosine",
        "vectors": len(index),
        "next_key": index._next_key,
        "ann_threshold": index.ann_threshold,
        "build_seconds": index.build_seconds,
        "backend": index.backend,
        "ann": {
            "library": _ANN_LIBRARY,
            "library_version": _usearch_version(),
            "parameters": asdict(index.ann_parameters),
            "file": graph_file,
            "removed_since_build": ann.removed_since_build if ann is not None else 0,
        },
        # every row each segment holds, live or not: what compaction weighs
        "segments": dict(sorted(segment_rows.items())),
        "partitions": {
            prefix: {"segment": segment_of[prefix], "count": len(p.keys), "fingerprint": p.fingerprint}
            for prefix, p in sorted(index._partitions.items())
        },
    }


def _usearch_version() -> str:
    import usearch

    return str(usearch.__version__)


def _files_named(manifest: Mapping[str, Any] | None) -> list[str]:
    """The data files a manifest names; of format 1 too, so a rebuild's save deletes an old layout's files."""
    if manifest is None:
        return []
    version = manifest.get("format_version")
    if version == 1:
        names = [entry["file"] for entry in manifest["partitions"]]
    elif version == FORMAT_VERSION:
        names = list(manifest["segments"])
    else:
        return []  # a layout this code does not know: leave its files alone
    if manifest["ann"]["file"] is not None:
        names.append(manifest["ann"]["file"])
    return names


def _read_manifest(folder: _IndexFolder) -> dict[str, Any] | None:
    body = read_versioned(folder, MANIFEST_NAME).body
    return None if body is None else _parsed_manifest(body, folder.file(MANIFEST_NAME))


def _parsed_manifest(body: bytes, file: str) -> dict[str, Any]:
    try:
        manifest = json.loads(body.decode("utf-8"))
    except ValueError as error:
        raise SearchIndexError(f"{file} is not a readable manifest: {error}") from error
    if not isinstance(manifest, dict):
        raise SearchIndexError(f"{file} is not a readable manifest: not a JSON object")
    return manifest


def _parsed_manifest_or_none(body: bytes | None) -> dict[str, Any] | None:
    """A manifest being replaced: unreadable (damaged) is as good as none, its files become orphans."""
    if body is None:
        return None
    try:
        manifest = _parsed_manifest(body, MANIFEST_NAME)
        _files_named(manifest)
    except (SearchIndexError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _segment_schema(width: int) -> pa.Schema:
    return pa.schema(
        [
            ("prefix", pa.string()),
            ("key", pa.uint64()),
            ("image_id", pa.string()),
            ("vector", pa.list_(pa.float32(), width)),
        ]
    )


def _write_segment(folder: _IndexFolder, name: str, partitions: Sequence[tuple[str, _Partition]]) -> int:
    """One parquet file of these partitions' rows, a row group per few partitions; the bytes written."""
    width = partitions[0][1].vectors.shape[1]
    if folder.is_local:
        folder.filesystem.create_dir(folder.file(name.rsplit("/", 1)[0]), recursive=True)
    with folder.filesystem.open_output_stream(folder.file(name)) as stream:
        # normalised float32 hardly compresses: no codec, and no statistics nobody reads, keep writing
        # fast; the prefix column, a few values repeated, is dictionary-encoded
        with pq.ParquetWriter(
            stream, _segment_schema(width), compression="none", use_dictionary=["prefix"], write_statistics=False
        ) as writer:
            for group in _row_groups(partitions, max(1, _SEGMENT_ROW_GROUP_BYTES // (4 * width))):
                writer.write_table(_segment_table(group, width), row_group_size=None)
        return stream.tell()


def _row_groups(
    partitions: Sequence[tuple[str, _Partition]], rows_per_group: int
) -> Iterable[list[tuple[str, _Partition]]]:
    # whole partitions per group: a partition larger than a group gets one to itself
    group: list[tuple[str, _Partition]] = []
    rows = 0
    for prefix, partition in partitions:
        if group and rows + len(partition.keys) > rows_per_group:
            yield group
            group, rows = [], 0
        group.append((prefix, partition))
        rows += len(partition.keys)
    if group:
        yield group


def _segment_table(group: Sequence[tuple[str, _Partition]], width: int) -> pa.Table:
    flat = pa.array(np.concatenate([partition.vectors for _, partition in group]).reshape(-1), pa.float32())
    return pa.table(
        {
            "prefix": pa.array(
                [prefix for prefix, partition in group for _ in range(len(partition.keys))], pa.string()
            ),
            "key": pa.array(np.concatenate([partition.keys for _, partition in group]), pa.uint64()),
            "image_id": pa.array([image_id for _, partition in group for image_id in partition.image_ids], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, width),
        },
        schema=_segment_schema(width),
    )


@dataclass
class _Rows:
    """One partition's rows as read from a segment, in pieces (one per row group that held some)."""

    keys: list[np.ndarray]
    image_ids: list[str]
    vectors: list[np.ndarray]


def _read_segment(folder: _IndexFolder, name: str, width: int, prefixes: set[str]) -> dict[str, _Rows]:
    """The rows of `prefixes` in one segment; rows of other prefixes (replaced since) are skipped."""
    found: dict[str, _Rows] = {}
    try:
        with folder.filesystem.open_input_file(folder.file(name)) as source:
            # pre_buffer: one coalesced read per row group, not one per column (a GET each on S3)
            parquet = pq.ParquetFile(source, pre_buffer=True)
            columns = parquet.schema_arrow.names
            if list(columns) != list(_SEGMENT_COLUMNS):
                raise SearchIndexError(f"{folder.file(name)} has columns {columns}, expected {list(_SEGMENT_COLUMNS)}")
            for group in range(parquet.num_row_groups):
                _take_rows(parquet.read_row_group(group), width, prefixes, found)
    except FileNotFoundError as missing:
        raise _NamedFileMissing(name) from missing
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as damaged:  # truncated, empty, not parquet, wrong width
        raise SearchIndexError(f"{folder.file(name)} is not a readable index segment: {damaged}") from damaged
    return found


def _take_rows(table: pa.Table, width: int, prefixes: set[str], found: dict[str, _Rows]) -> None:
    encoded = pc.dictionary_encode(table.column("prefix").combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    # rows grouped by prefix, each group in the order written (a stable sort)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if len(order) else np.empty(0, int)
    ends = np.r_[starts[1:], len(order)]
    keys = table.column("key").to_numpy().astype(np.uint64, copy=False)
    image_ids = table.column("image_id").to_pylist()
    column = table.column("vector").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    for start, end in zip(starts.tolist(), ends.tolist()):
        prefix = names[sorted_codes[start]]
        if prefix not in prefixes:
            continue
        rows = order[start:end]
        # fancy indexing copies: nothing keeps the row group's buffers alive
        piece = found.setdefault(prefix, _Rows([], [], []))
        piece.keys.append(keys[rows])
        piece.image_ids.extend(image_ids[row] for row in rows.tolist())
        piece.vectors.append(vectors[rows].astype(np.float32, copy=False))


def _partition_of(rows: _Rows | None, width: int, fingerprint: str, segment: str | None) -> _Partition:
    if rows is None:
        return _Partition(fingerprint, np.empty(0, np.uint64), [], np.empty((0, width), np.float32), {}, segment)
    vectors = rows.vectors[0] if len(rows.vectors) == 1 else np.concatenate(rows.vectors)
    keys = rows.keys[0] if len(rows.keys) == 1 else np.concatenate(rows.keys)
    row_of_id = {image_id: row for row, image_id in enumerate(rows.image_ids)}
    return _Partition(fingerprint, keys, rows.image_ids, np.ascontiguousarray(vectors), row_of_id, segment)


def _write_graph_file(folder: _IndexFolder, name: str, graph: UsearchIndex) -> int:
    # usearch writes to a local path; the copy goes wherever the folder is
    with tempfile.TemporaryDirectory(prefix="imgemb-index-") as scratch:
        local = os.path.join(scratch, "graph.usearch")
        graph.save(local)
        if folder.is_local:
            folder.filesystem.create_dir(folder.file(name.rsplit("/", 1)[0]), recursive=True)
        pafs.copy_files(local, folder.file(name), pafs.LocalFileSystem(), folder.filesystem)
        return os.path.getsize(local)


def _read_graph_file(folder: _IndexFolder, name: str) -> UsearchIndex:
    with tempfile.TemporaryDirectory(prefix="imgemb-index-") as scratch:
        local = os.path.join(scratch, "graph.usearch")
        try:
            pafs.copy_files(folder.file(name), local, folder.filesystem, pafs.LocalFileSystem())
        except FileNotFoundError as missing:
            raise _NamedFileMissing(name) from missing
        try:
            graph = UsearchIndex.restore(local)  # loads into memory; the file can go
        except (ValueError, RuntimeError) as damaged:
            raise SearchIndexError(f"{folder.file(name)} is not a readable usearch index: {damaged}") from damaged
    if graph is None:
        raise SearchIndexError(f"{folder.file(name)} is not a usearch index")
    return graph


def stored_index_bytes(lake: Lake, model_id: str) -> int:
    """Bytes of the saved index's files (manifest included); 0 when there is none."""
    folder = _index_folder(lake, model_id)
    manifest = _read_manifest(folder)
    if manifest is None:
        return 0
    names = [MANIFEST_NAME, *_files_named(manifest)]
    infos = folder.filesystem.get_file_info([folder.file(name) for name in names])
    return sum(info.size or 0 for info in infos)


@dataclass(frozen=True)
class StoredIndexes:
    """What the index folders under a lake root hold."""

    model_ids: list[str]  # sorted: the models whose folder holds a readable manifest
    damaged: dict[str, str]  # folder uri -> why its manifest cannot be read


def stored_indexes(lake: Lake) -> StoredIndexes:
    """Every index folder under the lake root: its model_id from its manifest, or why that cannot be read.

    Read from each folder's manifest: folder names are lossy (a long or odd
    model_id becomes a stem and a hash). A folder without a manifest (a save
    that never finished its first manifest) holds no index; an index of another
    format is listed (`load_index` refuses it, and the caller builds it again).
    """
    root = _folder_at(_index_root_uri(lake), lake)
    listed = root.filesystem.get_file_info(pafs.FileSelector(root.path, allow_not_found=True, recursive=False))
    model_ids: set[str] = set()
    damaged: dict[str, str] = {}
    for info in listed:
        if info.type != pafs.FileType.Directory:
            continue
        try:
            manifest = _read_manifest(_IndexFolder(root.filesystem, info.path, root.is_local, root.storage_options))
        except SearchIndexError as exc:
            damaged[_uri_of(root, info.path)] = str(exc)
            continue
        if manifest is None:
            continue
        if isinstance(manifest.get("model_id"), str):
            model_ids.add(manifest["model_id"])
        else:
            damaged[_uri_of(root, info.path)] = f"{info.path}/{MANIFEST_NAME} names no model_id"
    return StoredIndexes(sorted(model_ids), damaged)


def stored_model_ids(lake: Lake) -> list[str]:
    """The model_ids with a readable index manifest under the lake root, sorted; empty when there is none."""
    return stored_indexes(lake).model_ids


def set_damaged_index_aside(lake: Lake, folder_uri: str) -> str:
    """Rename the damaged manifest of an index folder that no model claims, so it is no longer an index; its new name."""
    folder = _folder_at(folder_uri, lake)
    aside = f"{MANIFEST_NAME}.damaged-{int(time.time())}"
    folder.filesystem.move(folder.file(MANIFEST_NAME), folder.file(aside))
    return folder.file(aside)


def _uri_of(root: _IndexFolder, path: str) -> str:
    return path if root.is_local else f"s3://{path}"


__all__ = [
    "DEFAULT_ANN_THRESHOLD",
    "AmbiguousImageId",
    "AnnParameters",
    "IndexCommitConflict",
    "IndexMissing",
    "IndexUpdatePlan",
    "InvalidPartition",
    "ModelMismatch",
    "Neighbour",
    "PartitionVectors",
    "SaveReport",
    "SearchIndex",
    "SearchIndexError",
    "StoredIndexes",
    "UnknownImageId",
    "UpdateReport",
    "index_folder_uri",
    "index_metadata",
    "index_root",
    "load_index",
    "read_partition_models",
    "recall_at_k",
    "save_index",
    "stored_index_bytes",
    "stored_indexes",
    "stored_model_ids",
]
