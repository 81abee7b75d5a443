"""The search index on a real-photo corpus through the project's own pipeline, and on 100,000 vectors: recall,
latency, build time, size, and what the index asset costs to update after one new prefix.

    python -m bench.search_corpus [--corpus DIR] [--work-dir DIR] [--large 100000] [--repeats 3]

RANDOM WEIGHTS: ResNet50 runs with random-initialised weights (IMGEMB_MODEL_WEIGHTS=random;
pretrained weights cannot be downloaded here). Timings and recall of the index do not
depend on the weights' quality; label scores do, and are meaningless here.

1. Corpus: `--corpus DIR` (default WORK_DIR/corpus); made with
   `/work/shared/corpus/make_corpus.py --n 1000 --seed 0` when it has no manifest.json.
2. Pipeline, in this process, on a fresh `instance_for_test()` and a fresh lake under
   WORK_DIR: the sales job, then `embed_prefix` over every prefix but the last in one
   run (range tags, as the demo does), then `refresh_search_index` (the full build through
   the asset); then `embed_prefix` for the held-out last prefix, and `refresh_search_index`
   again (the incremental update after one new prefix). Both job wall times are reported
   with the `refresh_seconds` / `index_update_seconds` metadata of each `image_search_index`
   materialization. Then `refresh_search_indexes(lake)` alone, on copies of the final
   embedding table: with no index (full build) against the index as the first job left it
   (one prefix new), `--repeats` times alternating, median.
3. Index on the corpus vectors (every indexed vector is a query, itself included):
   `SearchIndex` exact (the default below 50,000 vectors) against HNSW forced on
   (`ann_threshold=0`), built from the same partitions read from the lake: recall@10
   against exact search, single-query p50/p99, build seconds, bytes in memory and as saved
   to a scratch lake. The same at `--large` vectors of width 2048 (`bench.search_index`'s
   low-rank ReLU vectors, 10 partitions; a fixed sample of 200 indexed vectors as queries).
4. Label sanity: kNN agreement@10 with the manifest's base photo as the label
   (`evaluate_embeddings`); meaningless with random weights, and printed as such.

Prints a markdown table, the asset's full against incremental seconds, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dagster import DagsterInstance, ExecuteInProcessResult, instance_for_test
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from bench import print_summary
from bench.search_index import dataset, latencies_ms, partitions_of
from imgemb_assets.core.evaluation.scores import evaluate_embeddings
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index.partitions import PartitionVectors, read_partition_models
from imgemb_assets.core.search.index.persistence import INDEX_FOLDER, load_index, save_index, stored_index_bytes
from imgemb_assets.core.search.index.search_index import SearchIndex

# Imported here, before any job runs, so that the first refresh job does not pay for
# importing usearch and the refresh code and the two job times compare the work alone.
from imgemb_assets.core.search.refresh import refresh_search_indexes
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.dagster_wiring.backfills import QUIET_CONSOLE
from imgemb_assets.dagster_wiring.names import (
    PREFIX_JOB_NAME,
    S3_PREFIX_PARTITIONS_NAME,
    SALES_JOB_NAME,
    SEARCH_INDEX,
    SEARCH_INDEX_JOB_NAME,
)

_MAKE_CORPUS = Path("/work/shared/corpus/make_corpus.py")
_K = 10
# Queries for latency (and, at the large size, for recall): p99 of 200 is the 3rd-worst, not the worst.
_SAMPLE = 200
_WIDTH = 2048
_WEIGHTS = "random"
_NEVER_ANN = 2**62  # an ann_threshold no index reaches: exact search at any size


# --- the corpus and the pipeline ---------------------------------------------------------------------------


def ensure_corpus(corpus: Path, size: int) -> dict[str, Any]:
    """The corpus's manifest, making the corpus first when it has none."""
    manifest = corpus / "manifest.json"
    if not manifest.exists():
        print(f"making a {size}-photo corpus in {corpus} ...", flush=True)
        subprocess.run(
            [sys.executable, str(_MAKE_CORPUS), "--out", str(corpus), "--n", str(size), "--seed", "0"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return json.loads(manifest.read_text())


@dataclass(frozen=True)
class JobTiming:
    wall_s: float
    step_s: float  # the asset's step alone (Dagster's STEP_SUCCESS duration): the run's own overhead excluded
    refresh_s: float  # the asset's `refresh_seconds`: refresh_search_indexes, the save included
    index_update_s: float  # its `index_update_seconds`: SearchIndex.update in memory only
    partitions_read: int
    vectors_indexed: int
    backend: str


@dataclass(frozen=True)
class PipelineRun:
    lake_dir: Path
    prefixes: list[str]
    embed_s: float  # embed_prefix over every prefix but the last, one run
    full: JobTiming  # refresh_search_index after those
    incremental: JobTiming  # refresh_search_index after the held-out prefix
    index_after_full: Path  # the index folder as the full build left it


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def index_job_timing(wall_s: float, result: ExecuteInProcessResult) -> JobTiming:
    step_s = sum(event.event_specific_data.duration_ms for event in result.all_events if event.is_step_success) / 1000
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == SEARCH_INDEX:
            values = {key: value.value for key, value in materialization.metadata.items()}
            return JobTiming(
                wall_s, step_s, float(values["refresh_seconds"]), float(values.get("index_update_seconds", 0.0)),
                int(values["partitions_read"]), int(values.get("vectors_indexed", 0)), str(values.get("backend", "-")),
            )  # fmt: skip
    raise RuntimeError(f"{SEARCH_INDEX_JOB_NAME} materialized no {SEARCH_INDEX}")


def run_pipeline(instance: DagsterInstance, corpus: Path, run_dir: Path) -> PipelineRun:
    lake_dir = run_dir / "lake"
    os.environ.update(
        IMGEMB_RAW_IMAGES_URI=str(corpus / "raw-images"), IMGEMB_SALES_URI=str(corpus / "sales-data"),
        IMGEMB_LAKE_URI=str(lake_dir), IMGEMB_MODEL_WEIGHTS=_WEIGHTS,
    )  # fmt: skip
    # Imported after the variables are set: the code location reads them when it is built.
    from imgemb_assets.definitions import defs as location_definitions

    defs = location_definitions()
    prefixes = sorted(open_object_store(os.environ["IMGEMB_RAW_IMAGES_URI"]).list_prefixes())
    instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, prefixes)
    held_out, earlier = prefixes[-1], prefixes[:-1]
    embed = defs.resolve_job_def(PREFIX_JOB_NAME)
    refresh = defs.resolve_job_def(SEARCH_INDEX_JOB_NAME)

    def run(job: Any, **kwargs: Any) -> tuple[float, ExecuteInProcessResult]:
        seconds, result = timed(lambda: job.execute_in_process(instance=instance, run_config=QUIET_CONSOLE, **kwargs))
        if not result.success:
            raise RuntimeError(f"{job.name} failed")
        return seconds, result

    print("sales ...", flush=True)
    run(defs.resolve_job_def(SALES_JOB_NAME))
    print(f"embed_prefix {earlier[0]} .. {earlier[-1]} in one run ...", flush=True)
    range_tags = {ASSET_PARTITION_RANGE_START_TAG: earlier[0], ASSET_PARTITION_RANGE_END_TAG: earlier[-1]}
    embed_s, _ = run(embed, tags=range_tags)
    print(f"  {embed_s:.1f} s\n{SEARCH_INDEX_JOB_NAME} (full build) ...", flush=True)
    full = index_job_timing(*run(refresh))
    # Kept for the direct measurement: the index as it was before the held-out prefix arrived.
    index_after_full = run_dir / "index-after-full"
    shutil.copytree(lake_dir / INDEX_FOLDER, index_after_full)
    print(f"  {full.wall_s:.1f} s\nembed_prefix {held_out} ...", flush=True)
    run(embed, partition_key=held_out)
    print(f"{SEARCH_INDEX_JOB_NAME} (after one new prefix) ...", flush=True)
    incremental = index_job_timing(*run(refresh))
    print(f"  {incremental.wall_s:.1f} s", flush=True)
    return PipelineRun(lake_dir, prefixes, embed_s, full, incremental, index_after_full)


def direct_refreshes(run: PipelineRun, scratch: Path, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of `refresh_search_indexes` with no index, and with the index one prefix behind, alternating.

    Only the embedding table and the index folder are copied: the refresh reads nothing else.
    Copies keep the Delta log's relative file names, so the partitions' fingerprints are unchanged.
    """
    full_s, incremental_s = [], []
    for attempt in range(repeats):
        for kind, seconds in (("full", full_s), ("incremental", incremental_s)):
            root = scratch / f"{kind}-{attempt}"
            shutil.copytree(run.lake_dir / tables.IMAGE_EMBEDDINGS, root / tables.IMAGE_EMBEDDINGS)
            if kind == "incremental":
                shutil.copytree(run.index_after_full, root / INDEX_FOLDER)
            elapsed, refresh = timed(lambda: refresh_search_indexes(Lake(str(root))))
            expected = len(run.prefixes) if kind == "full" else 1
            if len(refresh.partitions_read) != expected:
                raise RuntimeError(
                    f"{kind} refresh read {len(refresh.partitions_read)} partitions, expected {expected}"
                )
            seconds.append(elapsed)
            shutil.rmtree(root)
    return full_s, incremental_s


# --- the index, exact against HNSW -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    case: str
    vectors: int
    backend: str
    recall_at_10: float
    p50_ms: float
    p99_ms: float
    build_s: float
    memory_bytes: int
    stored_bytes: int

    def line(self) -> str:
        return (
            f"| {self.case:<16s} | {self.vectors:>7d} | {self.backend:<13s} | {self.recall_at_10:>9.4f} | "
            f"{self.p50_ms:>7.2f} | {self.p99_ms:>7.2f} | {self.build_s:>8.2f} | "
            f"{self.memory_bytes / 2**20:>10.1f} | {self.stored_bytes / 2**20:>10.1f} |"
        )


_COLUMNS = (("case", 16, "<"), ("vectors", 7, ">"), ("backend", 13, "<"), ("recall@10", 9, ">"), ("p50 ms", 7, ">"),
            ("p99 ms", 7, ">"), ("build s", 8, ">"), ("memory MiB", 10, ">"), ("stored MiB", 10, ">"))  # fmt: skip
HEADER = (
    "| "
    + " | ".join(f"{name:{align}{width}s}" for name, width, align in _COLUMNS)
    + " |\n"
    + "|"
    + "|".join("-" * (width + 1) + (":" if align == ">" else "-") for _, width, align in _COLUMNS)
    + "|"
)


def neighbour_sets(results: list[list[Any]]) -> list[set[tuple[str, str]]]:
    return [{(n.prefix, n.image_id) for n in row} for row in results]


def recall_against(found: list[set[tuple[str, str]]], truth: list[set[tuple[str, str]]]) -> float:
    return float(np.mean([len(a & b) / max(len(b), 1) for a, b in zip(found, truth)]))


def stored_bytes_of(index: SearchIndex) -> int:
    """Bytes of the index's files once saved to a scratch lake (removed after)."""
    with tempfile.TemporaryDirectory(prefix="bench-search-corpus-save-") as scratch:
        lake = Lake(scratch)
        save_index(index, lake)
        return stored_index_bytes(lake, index.model_id)


def measure(
    case: str, model_id: str, partitions: Sequence[PartitionVectors], queries: np.ndarray,
    truth: list[set[tuple[str, str]]], ann: bool,
) -> Row:  # fmt: skip
    """One index over `partitions`, HNSW forced on (threshold 0) or off (a threshold no size reaches).

    Forced off rather than left at the default: at 100,000 vectors the default (50,000) would be HNSW too.
    """
    index = SearchIndex.build(model_id, int(queries.shape[1]), partitions, ann_threshold=0 if ann else _NEVER_ANN)
    found = neighbour_sets(index.search(queries, _K))
    p50, p99 = latencies_ms(lambda query: index.search(query, _K), queries[:_SAMPLE])
    row = Row(case, len(index), index.backend, recall_against(found, truth), p50, p99, index.build_seconds,
              index.memory_bytes(), stored_bytes_of(index))  # fmt: skip
    print(row.line(), flush=True)
    return row


def bench_pair(label: str, model_id: str, partitions: Sequence[PartitionVectors], queries: np.ndarray) -> list[Row]:
    """Exact and HNSW over the same partitions; the truth is exact search, computed once."""
    reference = SearchIndex(model_id, int(queries.shape[1]), ann_threshold=_NEVER_ANN)
    reference.update(partitions)
    truth = neighbour_sets(reference.exact_search(queries, _K))
    del reference  # its vectors: 800 MB at the large size
    return [
        measure(f"{label} exact", model_id, partitions, queries, truth, ann=False),
        measure(f"{label} ANN", model_id, partitions, queries, truth, ann=True),
    ]


def corpus_partitions(lake: Lake) -> tuple[str, list[PartitionVectors]]:
    """The one model's vectors per prefix, as the index refresh reads them."""
    fingerprints = lake.partition_fingerprints(tables.IMAGE_EMBEDDINGS)
    by_prefix = {prefix: read_partition_models(lake, prefix, fp) for prefix, fp in sorted(fingerprints.items())}
    models = {model_id for by_model in by_prefix.values() for model_id in by_model}
    if len(models) != 1:
        raise RuntimeError(f"expected one model in {tables.IMAGE_EMBEDDINGS}, found {sorted(models)}")
    model_id = models.pop()
    return model_id, [by_model[model_id] for by_model in by_prefix.values() if model_id in by_model]


# --- labels ------------------------------------------------------------------------------------------------


def label_scores(partitions: Sequence[PartitionVectors], manifest: dict[str, Any]) -> dict[str, Any]:
    base_of = {image["image_id"]: image["base"] for image in manifest["images"]}
    image_ids = [image_id for p in partitions for image_id in p.image_ids]
    vectors = np.concatenate([np.asarray(p.vectors, np.float32) for p in partitions])
    evaluation = evaluate_embeddings(vectors, [base_of.get(i) for i in image_ids], weights_are_random=True)
    return {
        "knn_agreement_at_10": evaluation.knn_agreement,
        "knn_agreement_chance": evaluation.knn_agreement_chance,
        "silhouette": evaluation.silhouette,
        "labels": evaluation.labels,
        "labelled_vectors": evaluation.labelled_sampled,
    }


def rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in values.items()}


def shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# --- main --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "imgemb-search-corpus")
    parser.add_argument(
        "--corpus", type=Path, help="corpus folder (default WORK_DIR/corpus; made when it has no manifest)"
    )
    parser.add_argument("--corpus-size", type=int, default=1000, help="photos, when the corpus is made")
    parser.add_argument("--large", type=int, default=100_000, help="vectors of the synthetic size")
    parser.add_argument("--repeats", type=int, default=3, help="alternating direct refreshes, full and incremental")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = (args.corpus or work_dir / "corpus").resolve()
    print(f"RANDOM WEIGHTS: ResNet50 with random-initialised weights (IMGEMB_MODEL_WEIGHTS={_WEIGHTS}); "
          "index timings and recall are real, label scores are meaningless.")  # fmt: skip
    manifest = ensure_corpus(corpus, args.corpus_size)
    print(f"corpus {corpus}: {len(manifest['images'])} photos from {len(manifest['bases'])} base photos, "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_dir))  # a fresh lake each time
    with instance_for_test() as instance:
        pipeline_s, run = timed(lambda: run_pipeline(instance, corpus, run_dir))
    print(f"pipeline {pipeline_s:.0f} s; refresh_search_indexes alone, {args.repeats}x alternating ...", flush=True)
    direct_full, direct_incremental = direct_refreshes(run, run_dir / "direct", args.repeats)

    lake = Lake(str(run.lake_dir))
    model_id, partitions = corpus_partitions(lake)
    loaded = load_index(lake, model_id)  # what the asset saved: it must hold the same vectors
    corpus_vectors = np.concatenate([np.asarray(p.vectors, np.float32) for p in partitions])
    if len(loaded) != len(corpus_vectors):
        raise RuntimeError(f"the asset's index holds {len(loaded)} vectors, the table {len(corpus_vectors)}")
    print(f"\nmodel {model_id}; the asset's index: {len(loaded)} vectors, {loaded.backend}\n")
    print(HEADER, flush=True)
    photos = len(manifest["images"])
    rows = bench_pair(
        f"{photos // 1000}k corpus" if photos >= 1000 else f"{photos}-photo corpus",
        model_id,
        partitions,
        corpus_vectors,
    )
    # bench.search_index's low-rank clustered vectors through a ReLU (CNN features' shape, not noise), 10 partitions
    large_vectors = dataset(args.large, _WIDTH, "lowrank", seed=1)
    sample = np.random.default_rng(0).choice(args.large, size=_SAMPLE, replace=False)
    large_started = time.perf_counter()
    rows += bench_pair(f"{args.large // 1000}k", "bench", partitions_of(large_vectors), large_vectors[np.sort(sample)])
    large_s = time.perf_counter() - large_started
    del large_vectors
    labels = label_scores(partitions, manifest)

    full, incremental = run.full, run.incremental
    print(f"\nqueries: corpus, all {len(corpus_vectors)} indexed vectors (recall; the first {_SAMPLE} for latency); "
          f"{args.large // 1000}k: random low-rank ReLU vectors of width {_WIDTH} (bench.search_index's 'lowrank'), "
          f"a fixed sample of {_SAMPLE} indexed vectors. Each query's own vector counts among its 10. Exact rows are "
          f"exact search forced (the default switches to HNSW at 50,000 vectors). Large size: {large_s:.0f} s.")  # fmt: skip
    print(f"\nindex asset ({SEARCH_INDEX_JOB_NAME} job, {full.backend}): full build over {full.partitions_read} prefixes "
          f"{full.wall_s:.2f} s (step {full.step_s:.2f} s, refresh_seconds {full.refresh_s:.3f}, index_update_seconds {full.index_update_s:.3f}); "
          f"after one new prefix {incremental.wall_s:.2f} s (step {incremental.step_s:.2f} s, refresh_seconds {incremental.refresh_s:.3f}, "
          f"index_update_seconds {incremental.index_update_s:.3f}); ratio job {incremental.wall_s / full.wall_s:.3f}, step {incremental.step_s / full.step_s:.3f}, "
          f"refresh_seconds {incremental.refresh_s / full.refresh_s:.3f}")  # fmt: skip
    direct_ratio = statistics.median(direct_incremental) / statistics.median(direct_full)
    print(f"refresh_search_indexes alone (median of {args.repeats}): no index -> {len(run.prefixes)} prefixes "
          f"{statistics.median(direct_full):.3f} s; one prefix new {statistics.median(direct_incremental):.3f} s; "
          f"ratio {direct_ratio:.3f}")  # fmt: skip
    print(f"\nlabel sanity (base photo as label, {labels['labels']} labels): kNN agreement@10 "
          f"{shown(labels['knn_agreement_at_10'])} (chance {shown(labels['knn_agreement_chance'])}), silhouette "
          f"{shown(labels['silhouette'])}. MEANINGLESS: the weights are random, so this says nothing about the "
          "embeddings' quality (untrained convolutions still pass on colour and texture statistics, which crops "
          "of one photo share); it only shows the evaluation runs on the corpus.\n")  # fmt: skip

    summary: dict[str, Any] = {
        "weights": _WEIGHTS,
        "cpu_count": os.cpu_count(),
        "corpus_photos": len(manifest["images"]),
        "prefixes": len(run.prefixes),
        "held_out_prefix": run.prefixes[-1],
        "model_id": model_id,
        "embed_all_but_last_s": round(run.embed_s, 1),
        "pipeline_s": round(pipeline_s, 1),
        "asset_full_job_s": round(full.wall_s, 3),
        "asset_incremental_job_s": round(incremental.wall_s, 3),
        "asset_incremental_over_full_job": round(incremental.wall_s / full.wall_s, 4),
        "asset_full_step_s": round(full.step_s, 3),
        "asset_incremental_step_s": round(incremental.step_s, 3),
        "asset_incremental_over_full_step": round(incremental.step_s / full.step_s, 4),
        "asset_full_refresh_s": full.refresh_s,
        "asset_incremental_refresh_s": incremental.refresh_s,
        "asset_incremental_over_full_refresh": round(incremental.refresh_s / full.refresh_s, 4),
        "asset_full_index_update_s": full.index_update_s,
        "asset_incremental_index_update_s": incremental.index_update_s,
        "direct_full_refresh_s": [round(s, 3) for s in direct_full],
        "direct_incremental_refresh_s": [round(s, 3) for s in direct_incremental],
        "direct_incremental_over_full": round(direct_ratio, 4),
        "label_knn_agreement_at_10_meaningless": labels["knn_agreement_at_10"],
        "label_knn_agreement_chance": labels["knn_agreement_chance"],
        "rows": [rounded(asdict(row)) for row in rows],
        "total_s": round(time.perf_counter() - started, 1),
    }
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
