"""Which similarity search the search index should use: exact search against approximate indexes, side by side;
and what saving and loading the index costs, in seconds and files.

    python -m bench.search_index [--sizes 1000,100000] [--width 2048] [--queries 100] [--data clustered|random]
                                 [--only search|persistence] [--persist-partitions 10000] [--persist-vectors 10]

Per size and library: recall@10 against exact search (held-out queries from the
same distribution), single-query latency p50/p99 in ms, build seconds, index
bytes, and the time to replace one partition (a tenth of the vectors) against
the full build. Libraries:

- exact f32: `SearchIndex` below its threshold (matrix product over L2-normalised float32);
- exact f16: the same with float16 storage, upcast block by block (half the memory);
- usearch HNSW: `SearchIndex` above its threshold (f16, connectivity 16, expansion 64/64);
- faiss IVF-Flat: inner product on normalised vectors, nlist = sqrt(N), nprobe 16; it removes by id
  (faiss's HNSW does not, so it cannot take an incremental update and is left out).

Data (`--data`): `lowrank` (the default) is closest to real embeddings: clusters in a
64-dimensional latent space mapped to `width` through a fixed ReLU layer (CNN features
have a low intrinsic dimension and are non-negative); `clustered` is non-negative
vectors around N/100 centres with isotropic noise in all `width` dimensions, and
`random` uniform directions on the sphere: the hard cases, where the ten nearest are
nearly as far as the next hundred and approximate indexes lose recall.

Persistence (`--only persistence` runs only this part): an exact index of
`--persist-partitions` partitions of `--persist-vectors` random vectors each, saved to a
local lake folder (or, `--persist-on s3`, a moto S3 server subprocess, where every file is
an HTTP request): the full save, a load, and the save after `--persist-changed`
partitions changed (plus a load of that), with the files each wrote or opened, counted
through a pyarrow filesystem wrapped around the real one. `--module` names another
module with the same API as `imgemb_assets.core.search.index.persistence` (`save_index`,
`load_index`, `_index_folder`; an earlier copy on PYTHONPATH, say) to measure the same
steps before a change, on the same machine.

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index.partitions import PartitionVectors
from imgemb_assets.core.search.index.search_index import SearchIndex
from imgemb_support.counting_filesystem import CountingHandler

_PARTITIONS = 10
_K = 10


@dataclass(frozen=True)
class Row:
    size: int
    library: str
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    build_s: float
    index_bytes: int
    update_one_partition_s: float

    def line(self) -> str:
        return (
            f"{self.size:>7d}  {self.library:<16s} {self.recall_at_10:>9.3f} {self.p50_ms:>8.2f} {self.p99_ms:>8.2f} "
            f"{self.build_s:>8.2f} {self.index_bytes / 2**20:>9.1f} {self.update_one_partition_s:>9.3f}"
        )


HEADER = f"{'vectors':>7s}  {'library':<16s} {'recall@10':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'build s':>8s} {'MiB':>9s} {'update s':>9s}"


def dataset(count: int, width: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((count, width), dtype=np.float32)
    if kind == "lowrank":
        # clusters in a 64-dimensional latent space, mapped to `width` through one fixed ReLU layer
        fixed = np.random.default_rng(12345)
        mapping = fixed.standard_normal((64, width), dtype=np.float32)
        centres = fixed.standard_normal((max(count // 100, 10), 64), dtype=np.float32)
        latent = centres[rng.integers(0, len(centres), count)] + 0.5 * rng.standard_normal(
            (count, 64), dtype=np.float32
        )
        return np.maximum(latent @ mapping, 0) + 0.05 * np.abs(rng.standard_normal((count, width), dtype=np.float32))
    centres_rng = np.random.default_rng(12345)  # the same centres for the data and its held-out queries
    clusters = max(count // 100, 10)
    centres = np.abs(centres_rng.standard_normal((clusters, width), dtype=np.float32))
    centres *= centres_rng.random((clusters, width)) < 0.3
    points = centres[rng.integers(0, clusters, count)]
    points += 0.5 * rng.standard_normal((count, width), dtype=np.float32)
    return np.abs(points)


def normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def partitions_of(vectors: np.ndarray) -> list[PartitionVectors]:
    bounds = np.linspace(0, len(vectors), _PARTITIONS + 1).astype(int)
    return [
        PartitionVectors(f"p{n:02d}", "f", [f"p{n:02d}-{i}" for i in range(start, end)], vectors[start:end])
        for n, (start, end) in enumerate(itertools.pairwise(bounds))
    ]


def latencies_ms(search_one: Callable[[np.ndarray], object], queries: np.ndarray) -> tuple[float, float]:
    search_one(queries[0])  # warm caches and lazy setup
    times = []
    for query in queries:
        started = time.perf_counter()
        search_one(query)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(row) & set(truth[i].tolist())) / _K for i, row in enumerate(found)]))


def row_ids(results: list[list], id_of: dict[tuple[str, str], int]) -> list[list[int]]:
    return [[id_of[(n.prefix, n.image_id)] for n in row] for row in results]


def bench_search_index(size, library, threshold, vectors, queries, truth, latency_queries, replacement) -> Row:
    parts = partitions_of(vectors)
    id_of = {(p.prefix, image_id): int(image_id.rsplit("-", 1)[1]) for p in parts for image_id in p.image_ids}
    index = SearchIndex.build("bench", vectors.shape[1], parts, ann_threshold=threshold)
    assert index.uses_ann == (threshold == 0)
    found = row_ids(index.search(queries, _K), id_of)
    p50, p99 = latencies_ms(lambda q: index.search(q, _K), latency_queries)
    first = parts[0]
    update = index.update([PartitionVectors(first.prefix, "f2", first.image_ids, replacement)])
    return Row(size, library, recall(found, truth), p50, p99, index.build_seconds, index.memory_bytes(), update.seconds)


def bench_exact_f16(size, vectors, queries, truth, latency_queries, replacement) -> Row:
    started = time.perf_counter()
    stored = normalised(vectors).astype(np.float16)
    build_s = time.perf_counter() - started
    block = 16_384

    def search(batch: np.ndarray) -> np.ndarray:
        batch = normalised(np.atleast_2d(batch))
        scores = np.concatenate(
            [batch @ stored[start : start + block].astype(np.float32).T for start in range(0, len(stored), block)],
            axis=1,
        )
        top = np.argpartition(-scores, _K - 1, axis=1)[:, :_K]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)

    found = search(queries).tolist()
    p50, p99 = latencies_ms(search, latency_queries)
    started = time.perf_counter()
    stored[: len(replacement)] = normalised(replacement).astype(np.float16)  # rows of one partition, in place
    update_s = time.perf_counter() - started
    return Row(size, "exact f16", recall(found, truth), p50, p99, build_s, stored.nbytes, update_s)


def bench_faiss_ivf(size, vectors, queries, truth, latency_queries, replacement) -> Row:
    import faiss

    width = vectors.shape[1]
    lists = max(1, int(np.sqrt(size)))
    started = time.perf_counter()
    data = normalised(vectors).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # small sizes: train on what there is, without the warning
    index.train(data[: min(size, 64 * lists)])
    index.add_with_ids(data, np.arange(size, dtype=np.int64))
    build_s = time.perf_counter() - started
    index.nprobe = min(16, lists)
    found = index.search(normalised(queries), _K)[1].tolist()
    p50, p99 = latencies_ms(lambda q: index.search(normalised(q[None, :]), _K), latency_queries)
    index_bytes = int(faiss.serialize_index(index).nbytes)
    started = time.perf_counter()
    ids = np.arange(len(replacement), dtype=np.int64)
    index.remove_ids(ids)
    index.add_with_ids(normalised(replacement).astype(np.float32), ids)
    update_s = time.perf_counter() - started
    return Row(size, f"faiss IVF{lists}", recall(found, truth), p50, p99, build_s, index_bytes, update_s)


def bench_size(size: int, width: int, kind: str, queries_count: int, latency_count: int) -> list[Row]:
    vectors = dataset(size, width, kind, seed=1)
    queries = dataset(queries_count, width, kind, seed=2)  # held out: not in the index
    replacement = dataset(size // _PARTITIONS, width, kind, seed=3)
    truth = np.argsort(-(normalised(queries) @ normalised(vectors).T), axis=1)[:, :_K]
    latency_queries = queries[:latency_count]
    rows = []
    for run in (
        lambda: bench_search_index(size, "exact f32", 10**12, vectors, queries, truth, latency_queries, replacement),
        lambda: bench_exact_f16(size, vectors, queries, truth, latency_queries, replacement),
        lambda: bench_search_index(size, "usearch HNSW f16", 0, vectors, queries, truth, latency_queries, replacement),
        lambda: bench_faiss_ivf(size, vectors, queries, truth, latency_queries, replacement),
    ):
        rows.append(run())
        print(rows[-1].line(), flush=True)
    return rows


# --- persistence: save and load, seconds and files -----------------------------------


@contextmanager
def counted_files(module: ModuleType) -> Iterator[CountingHandler]:
    """Route the persistence module's file access through a CountingHandler for the duration.

    `_index_folder` is private, but the one place both the old and the new layout
    open their files from: patching it counts what they really open, not what a
    listing afterwards would suggest.
    """
    original = module._index_folder
    counter = CountingHandler(pafs.LocalFileSystem())

    def counting_folder(lake: Lake, model_id: str) -> Any:
        folder = original(lake, model_id)
        counter.inner = folder.filesystem
        return type(folder)(pafs.PyFileSystem(counter), folder.path, folder.is_local)

    module._index_folder = counting_folder
    try:
        yield counter
    finally:
        module._index_folder = original


@dataclass(frozen=True)
class PersistenceRow:
    step: str
    seconds: float
    files_read: int
    files_written: int
    files_deleted: int
    mib_written: float
    files_in_folder: int

    def line(self) -> str:
        return (
            f"{self.step:<28s} {self.seconds:>8.2f} {self.files_read:>10d} {self.files_written:>13d} "
            f"{self.files_deleted:>13d} {self.mib_written:>11.1f} {self.files_in_folder:>15d}"
        )


PERSISTENCE_HEADER = (
    f"{'step':<28s} {'seconds':>8s} {'files read':>10s} {'files written':>13s} {'files deleted':>13s} "
    f"{'MiB written':>11s} {'files in folder':>15s}"
)


def files_in(module: ModuleType, lake: Lake, model_id: str) -> int:
    """Files under the index folder, listed through the module's own filesystem (S3's folder markers are not files)."""
    folder = module._index_folder(lake, model_id)
    listed = folder.filesystem.get_file_info(pafs.FileSelector(folder.path, recursive=True, allow_not_found=True))
    return sum(1 for info in listed if info.type == pafs.FileType.File)


@contextmanager
def lake_on(storage: str) -> Iterator[Lake]:
    """A new lake in a temporary folder, or in a bucket of a moto S3 server subprocess on 127.0.0.1."""
    if storage == "local":
        with tempfile.TemporaryDirectory(prefix="bench-search-index-") as scratch:
            yield Lake(str(Path(scratch) / "lake"))
        return
    from imgemb_assets.core.storage.s3 import S3Settings
    from imgemb_support.moto_server import client_environment, running_moto_server

    with running_moto_server() as endpoint:
        os.environ.update(client_environment(endpoint))
        S3Settings().client().create_bucket(Bucket="bench")
        yield Lake("s3://bench/lake", S3Settings().delta_storage_options_provider())


def bench_persistence(
    module: ModuleType, partitions: int, per_partition: int, width: int, changed: int, storage: str = "local"
) -> list[PersistenceRow]:
    """Full save, load, save after `changed` partitions changed, and the load after it, on a new lake."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((partitions * per_partition, width), dtype=np.float32)
    sources = [
        PartitionVectors(
            f"p{n:05d}",
            "f1",
            [f"p{n:05d}-{i}" for i in range(per_partition)],
            vectors[n * per_partition : (n + 1) * per_partition],
        )
        for n in range(partitions)
    ]
    index = SearchIndex.build("bench", width, sources, ann_threshold=10**12)  # exact: the vectors' files only
    del sources, vectors
    rows: list[PersistenceRow] = []
    with lake_on(storage) as lake:

        def saved(step: str, target: Any) -> None:
            with counted_files(module) as counter:
                report = module.save_index(target, lake)
            rows.append(
                PersistenceRow(
                    step,
                    report.seconds,
                    len(counter.read),
                    report.files_written,
                    report.files_deleted,
                    report.bytes_written / 2**20,
                    files_in(module, lake, "bench"),
                )
            )
            print(rows[-1].line(), flush=True)

        def loaded(step: str) -> Any:
            with counted_files(module) as counter:
                started = time.perf_counter()
                result = module.load_index(lake, "bench", width)
                seconds = time.perf_counter() - started
            assert len(result) == partitions * per_partition
            rows.append(
                PersistenceRow(
                    step, seconds, len(counter.read), len(counter.written), 0, 0.0, files_in(module, lake, "bench")
                )
            )
            print(rows[-1].line(), flush=True)
            return result

        saved(f"full save ({partitions} parts)", index)
        del index
        again = loaded("load")
        replaced = [
            PartitionVectors(
                f"p{n:05d}",
                "f2",
                [f"p{n:05d}-{i}" for i in range(per_partition)],
                rng.standard_normal((per_partition, width), dtype=np.float32),
            )
            for n in range(0, partitions, max(1, partitions // changed))[:changed]
        ]
        again.update(replaced)
        saved(f"save, {len(replaced)} parts changed", again)
        del again
        loaded("load after it")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=100, help="held-out queries for recall@10")
    parser.add_argument("--latency-queries", type=int, default=50, help="single queries timed for p50/p99")
    parser.add_argument("--data", choices=("lowrank", "clustered", "random"), default="lowrank")
    parser.add_argument("--only", choices=("search", "persistence"), help="run one part only (default: both)")
    parser.add_argument("--persist-partitions", type=int, default=10_000)
    parser.add_argument("--persist-vectors", type=int, default=10, help="vectors per partition")
    parser.add_argument(
        "--persist-changed", type=int, default=10, help="partitions changed before the incremental save"
    )
    parser.add_argument(
        "--persist-on",
        choices=("local", "s3"),
        default="local",
        help="a local folder, or a moto S3 server subprocess (needs the dev extra; slow: fewer partitions)",
    )
    parser.add_argument(
        "--module",
        default="imgemb_assets.core.search.index.persistence",
        help="the persistence module to measure (another copy with the same API, for a before/after)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    summary: dict[str, Any] = {"data": args.data, "width": args.width}
    if args.only != "persistence":
        print(f"width {args.width}, {args.data} data, {_PARTITIONS} partitions, update = replace one partition")
        print(HEADER)
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            rows += bench_size(size, args.width, args.data, args.queries, args.latency_queries)
        summary["rows"] = [row.__dict__ for row in rows]
    if args.only != "search":
        module = importlib.import_module(args.module)
        print(
            f"\npersistence ({args.module}): {args.persist_partitions} partitions x {args.persist_vectors} random "
            f"vectors of width {args.width}, {'local folder' if args.persist_on == 'local' else 'moto S3 server'}"
        )
        print(PERSISTENCE_HEADER)
        persistence = bench_persistence(
            module, args.persist_partitions, args.persist_vectors, args.width, args.persist_changed, args.persist_on
        )
        summary["persistence"] = {
            "module": args.module,
            "storage": args.persist_on,
            "partitions": args.persist_partitions,
            "vectors_per_partition": args.persist_vectors,
            "rows": [row.__dict__ for row in persistence],
        }
    print(f"total {time.perf_counter() - started:.0f} s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
