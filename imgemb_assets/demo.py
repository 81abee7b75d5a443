"""The main job on the embedded default: `python -m imgemb_assets.demo [--data-dir DIR]`.

Generates a sample dataset in a local folder, registers its prefixes as
partitions in a persistent Dagster instance inside that folder, materializes
every asset for every partition through Dagster, checks the tables against the
dataset, and prints a summary with the command that opens the UI on the same
instance. Running it again reuses the dataset and gives the same tables.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import polars as pl
from dagster import DagsterInstance, ExecuteInProcessResult
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from imgemb_assets.core.embedding.models import pretrained_weights_cached
from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset, generate_sample_dataset
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.dagster_wiring.backfills import QUIET_CONSOLE
from imgemb_assets.dagster_wiring.jobs import PREFIX_JOB_NAME, SALES_JOB_NAME, SEARCH_INDEX_JOB_NAME
from imgemb_assets.dagster_wiring.partitions import S3_PREFIX_PARTITIONS_NAME, register_prefixes
from imgemb_assets.dagster_wiring.similarity import SEARCH_INDEX
from imgemb_assets.definitions import defs as location_definitions

_RANDOM_WEIGHTS_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  RANDOM WEIGHTS: torchvision's pretrained ResNet50 weights are not in the
!!  local cache ({cache}) and this machine may be offline,
!!  so the demo runs ResNet50 with RANDOM-initialised weights (seed 0).
!!  The pipeline is exercised end to end, but the embeddings mean nothing.
!!  For real embeddings: IMGEMB_MODEL_WEIGHTS=DEFAULT (downloads once) or a
!!  path to a ResNet50 state-dict file.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def choose_weights(environ: Mapping[str, str]) -> tuple[str, bool]:
    """The weights setting for the demo, and whether it fell back to random weights."""
    configured = environ.get("IMGEMB_MODEL_WEIGHTS")
    if configured:
        return configured, False
    if pretrained_weights_cached("DEFAULT"):
        return "DEFAULT", False
    return "random", True


def demo_environment(data_dir: Path, dataset: SampleDataset, weights: str) -> dict[str, str]:
    """The variables the code location reads, pointing at the demo folder."""
    return {
        "DAGSTER_HOME": str(data_dir / "dagster_home"),
        "IMGEMB_RAW_IMAGES_URI": dataset.raw_images_uri,
        "IMGEMB_SALES_URI": dataset.sales_uri,
        "IMGEMB_LAKE_URI": str(data_dir / "lake"),
        "IMGEMB_MODEL_WEIGHTS": weights,
    }


# The instance settings shipped at the repository root (no telemetry, runs launched without the daemon's queue).
_SHIPPED_INSTANCE_CONFIG = Path(__file__).resolve().parents[1] / "dagster.yaml"


def prepare_dagster_home(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text(_SHIPPED_INSTANCE_CONFIG.read_text())


def register_partitions(instance: DagsterInstance, raw_images_uri: str) -> list[str]:
    # The demo's root holds first-level folders only: the default scheme's partitions are its folders.
    prefixes = PartitionedRoot(open_object_store(raw_images_uri), PartitionScheme()).current_partitions()
    register_prefixes(instance, prefixes)
    return prefixes


def materialize_all(instance: DagsterInstance, prefixes: list[str]) -> list[ExecuteInProcessResult]:
    defs = location_definitions()  # as Dagster loads the code location
    print("materializing sales ...", flush=True)
    results = [defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance, run_config=QUIET_CONSOLE)]
    # One run for every prefix (as a backfill of them would): the model is built once.
    print(f"materializing partitions {prefixes[0]} .. {prefixes[-1]} in one run ...", flush=True)
    range_tags = {ASSET_PARTITION_RANGE_START_TAG: prefixes[0], ASSET_PARTITION_RANGE_END_TAG: prefixes[-1]}
    results.append(
        defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
            instance=instance, tags=range_tags, run_config=QUIET_CONSOLE
        )
    )
    print("updating the search index and the near duplicates ...", flush=True)
    results.append(
        defs.resolve_job_def(SEARCH_INDEX_JOB_NAME).execute_in_process(instance=instance, run_config=QUIET_CONSOLE)
    )
    return results


def embedding_throughput(results: list[ExecuteInProcessResult]) -> tuple[int, int, float]:
    """(images embedded, vectors reused, seconds spent embedding) over all runs, from the asset's metadata."""
    embedded, reused, seconds = 0, 0, 0.0
    for result in results:
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key.to_user_string() == tables.IMAGE_EMBEDDINGS:
                metadata = materialization.metadata  # the embedding step writes these as numbers
                embedded += int(cast(int, metadata["images_embedded"].value))
                reused += int(cast(int, metadata["images_reused"].value))
                seconds += float(cast(float, metadata["embedding_seconds"].value))
    return embedded, reused, seconds


def check_lines(results: list[ExecuteInProcessResult]) -> list[str]:
    """One line per asset check evaluated in the runs: outcome, check, asset, partition, what it found."""
    lines = []
    for result in results:
        for evaluation in result.get_asset_check_evaluations():
            outcome = "passed" if evaluation.passed else f"FAILED ({evaluation.severity.value.lower()})"
            where = f"{evaluation.asset_key.to_user_string()} [{evaluation.partition or '-'}]"
            lines.append(f"  {outcome:16s} {evaluation.check_name:24s} {where:36s} {evaluation.description}")
    return lines


def table_counts(lake: Lake, prefixes: list[str]) -> pl.DataFrame:
    """Rows per table, in total and per prefix, read back with polars."""
    rows = []
    for name in (*tables.ALL_TABLES, *tables.DERIVED_TABLES):
        frame = pl.scan_delta(lake.table_uri(name))
        row: dict[str, object] = {"table": name, "total": frame.select(pl.len()).collect().item()}
        if name != tables.SALES:  # sales is not partitioned
            per_prefix = dict(frame.group_by(tables.PARTITION_COLUMN).agg(pl.len()).collect().iter_rows())
            row |= {prefix: per_prefix.get(prefix, 0) for prefix in prefixes}
        rows.append(row)
    return pl.DataFrame(rows, schema={"table": pl.String, "total": pl.UInt32} | {p: pl.UInt32 for p in prefixes})


def consistency_problems(lake: Lake, dataset: SampleDataset) -> list[str]:
    """What the tables disagree on with each other or with the generated dataset."""

    def rows(name: str, prefix: str) -> int:
        return pl.scan_delta(lake.table_uri(name)).filter(pl.col("prefix") == prefix).select(pl.len()).collect().item()

    problems = []
    for prefix in dataset.prefixes:
        manifest, images, rejected = (
            rows(name, prefix) for name in (tables.RAW_IMAGE_MANIFEST, tables.DOWNSCALED_IMAGES, tables.REJECTED_IMAGES)
        )
        joined, embedded = rows(tables.IMAGES_WITH_SALES, prefix), rows(tables.IMAGE_EMBEDDINGS, prefix)
        expected = dataset.expected_joined(prefix)
        if manifest != images + rejected:
            problems.append(f"{prefix}: manifest {manifest} != downscaled {images} + rejected {rejected}")
        if rejected != len(dataset.broken_files[prefix]):
            problems.append(f"{prefix}: rejected {rejected} != broken files {len(dataset.broken_files[prefix])}")
        if not embedded == joined == expected:
            problems.append(f"{prefix}: embeddings {embedded}, joined {joined}, expected {expected}")
    return problems


def print_summary(
    lake: Lake, dataset: SampleDataset, results: list[ExecuteInProcessResult], env: dict[str, str], wall_s: float
) -> None:
    with pl.Config(tbl_rows=100, tbl_cols=20, fmt_str_lengths=120, tbl_hide_dataframe_shape=True):
        print("\nRows per table and prefix:")
        print(table_counts(lake, dataset.prefixes))
        rejected = pl.read_delta(lake.table_uri(tables.REJECTED_IMAGES)).sort("uri")
        print(f"\nRejected files ({rejected.height}):")
        for row in rejected.iter_rows(named=True):
            print(f"  {row['uri']}\n      -> {row['reason']}")
    print("\nAsset checks:")
    print("\n".join(check_lines(results)))
    embedded, reused, seconds = embedding_throughput(results)
    weights = env["IMGEMB_MODEL_WEIGHTS"]
    if embedded:
        print(
            f"\nEmbedding step: {embedded} images in {seconds:.1f} s = {embedded / seconds:.1f} images/s ({weights} weights)"
        )
    else:
        print("\nEmbedding step: no image needed the model")
    print(f"  vectors reused from the stored tables (same image content and model): {reused}")
    print(f"Delta tables under: {lake.root_uri}")
    for name in (*tables.ALL_TABLES, *tables.DERIVED_TABLES):
        print(f"  {name:20s} {lake.table_uri(name)}")
    print(search_index_line(results))
    print(f"Wall time: {wall_s:.1f} s")
    exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    example, prefix = pl.read_delta(lake.table_uri(tables.IMAGE_EMBEDDINGS), columns=["image_id", "prefix"]).row(0)
    photo = next((Path(dataset.raw_images_uri) / prefix).glob(f"{example}.*"))
    print("\nFind the images most similar to one of them, or to any photo file:")
    print(f"  {exports} imgemb similar {example}")
    print(f"  {exports} imgemb similar --image {shlex.quote(str(photo))}")
    print("\nOpen the Dagster UI on the same instance (the runs above are there):")
    print(f"  {exports} dagster dev -w workspace.yaml")
    print(f"  or: make ui DEMO_DIR={shlex.quote(dataset.root)}")


def search_index_line(results: list[ExecuteInProcessResult]) -> str:
    for result in results:
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key.to_user_string() == SEARCH_INDEX:
                values = {key: value.value for key, value in materialization.metadata.items()}
                return (
                    f"Search index: {values.get('vectors_indexed', 0)} vectors of {values.get('model_id', '-')} "
                    f"({values.get('backend', '-')}, recall@10 {values.get('recall_at_10', '-')})"
                )
    return "Search index: not built"


def write_env_file(path: Path, env: dict[str, str]) -> None:
    path.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("demo-data"), help="folder for data, lake and instance")
    parser.add_argument("--images-per-prefix", type=int, default=100)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data_dir = args.data_dir.resolve()
    dataset = generate_sample_dataset(data_dir, images_per_prefix=args.images_per_prefix)
    weights, fell_back_to_random = choose_weights(os.environ)
    if fell_back_to_random:
        import torch

        print(_RANDOM_WEIGHTS_BANNER.format(cache=torch.hub.get_dir()), file=sys.stderr, flush=True)
    env = demo_environment(data_dir, dataset, weights)
    os.environ.update(env)  # read by Dagster's EnvVar when each run starts
    write_env_file(data_dir / "demo.env", env)
    prepare_dagster_home(Path(env["DAGSTER_HOME"]))
    with DagsterInstance.get() as instance:
        prefixes = register_partitions(instance, dataset.raw_images_uri)
        print(f"partitions of {S3_PREFIX_PARTITIONS_NAME}: {prefixes}", flush=True)
        results = materialize_all(instance, prefixes)
    lake = Lake(env["IMGEMB_LAKE_URI"])
    print_summary(lake, dataset, results, env, time.perf_counter() - started)
    if fell_back_to_random:
        print("\nNOTE: embeddings above come from RANDOM weights (see the banner at the start).")
    problems = consistency_problems(lake, dataset)
    for problem in problems:
        print(f"INCONSISTENT: {problem}", file=sys.stderr)
    if not problems:
        print("Consistency: manifest = downscaled + rejected; embeddings = joined = images with a sales row. OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
