"""The main job on the embedded default: `python -m imgemb_assets.demo [--data-dir DIR] [--model NAME]`.

Generates a sample dataset in a local folder, registers its prefixes as
partitions in a persistent Dagster instance inside that folder, materializes
every asset for every partition through Dagster, checks the tables against the
dataset, and prints a summary with the command that opens the UI on the same
instance. Running it again reuses the dataset and gives the same tables.
`--model` (or IMGEMB_MODEL) picks the backbone, ResNet50 by default; with a CLIP
(`clip_vit_b_32`) the summary adds each prefix's zero-shot agreement.
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

import dagster as dg
import polars as pl
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS, BACKBONES
from imgemb_assets.core.embedding.backbones.torchvision_weights import pretrained_weights_cached
from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset, generate_sample_dataset
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.dagster_wiring.backfills import QUIET_CONSOLE
from imgemb_assets.dagster_wiring.location.partitions import register_prefixes
from imgemb_assets.dagster_wiring.names import (
    PREFIX_JOB_NAME,
    S3_PREFIX_PARTITIONS_NAME,
    SALES_JOB_NAME,
    SEARCH_INDEX,
    SEARCH_INDEX_JOB_NAME,
)
from imgemb_assets.definitions import defs as location_definitions

# The location's own default backbone: the demo names no other unless asked (its output then stays as it was).
DEFAULT_MODEL = "resnet50"

_RANDOM_WEIGHTS_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  RANDOM WEIGHTS: torchvision's pretrained {label} weights are not in the
!!  local cache ({cache}) and this machine may be offline,
!!  so the demo runs {label} with RANDOM-initialised weights (seed 0).
!!  The pipeline is exercised end to end, but the embeddings mean nothing.
!!  For real embeddings: IMGEMB_MODEL_WEIGHTS=DEFAULT (downloads once) or a
!!  path to a {label} state-dict file.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""

_RANDOM_CLIP_WEIGHTS_BANNER = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  RANDOM WEIGHTS: IMGEMB_MODEL_WEIGHTS is unset and the demo downloads no
!!  open_clip weights, so it runs {model} with RANDOM-initialised weights
!!  (seed 0), image and text towers alike. The pipeline, the zero-shot
!!  scores and the search run end to end, but the embeddings mean nothing.
!!  For real embeddings: IMGEMB_MODEL_WEIGHTS=DEFAULT (open_clip's
!!  {tag}, downloaded once into {cache})
!!  or a checkpoint file.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def choose_weights(environ: Mapping[str, str], model: str = DEFAULT_MODEL) -> tuple[str, bool]:
    """The weights setting for the demo, and whether it fell back to random weights.

    torchvision's pretrained weights are taken when they are in its cache; open_clip's are
    never fetched by the demo (set IMGEMB_MODEL_WEIGHTS for them).
    """
    configured = environ.get("IMGEMB_MODEL_WEIGHTS")
    if configured:
        return configured, False
    spec = BACKBONE_SPECS[model]
    if spec.architecture is None:
        raise SystemExit(f"{model} takes its architecture from a checkpoint folder: set IMGEMB_MODEL_WEIGHTS to one")
    if spec.library == "torchvision" and pretrained_weights_cached("DEFAULT", model):
        return "DEFAULT", False
    return "random", True


def random_weights_banner(model: str) -> str:
    """What the demo prints before running `model` with random weights: why, and how to get real ones."""
    spec = BACKBONE_SPECS[model]
    if spec.library == "open_clip":
        from huggingface_hub import constants

        return _RANDOM_CLIP_WEIGHTS_BANNER.format(model=model, tag=spec.default_weights, cache=constants.HF_HUB_CACHE)
    import torch

    label = "ResNet50" if model == "resnet50" else model
    return _RANDOM_WEIGHTS_BANNER.format(label=label, cache=torch.hub.get_dir())


def demo_environment(
    data_dir: Path, dataset: SampleDataset, weights: str, model: str = DEFAULT_MODEL
) -> dict[str, str]:
    """The variables the code location reads, pointing at the demo folder (IMGEMB_MODEL unless the default)."""
    return {
        "DAGSTER_HOME": str(data_dir / "dagster_home"),
        "IMGEMB_RAW_IMAGES_URI": dataset.raw_images_uri,
        "IMGEMB_SALES_URI": dataset.sales_uri,
        "IMGEMB_LAKE_URI": str(data_dir / "lake"),
        "IMGEMB_MODEL_WEIGHTS": weights,
        **({"IMGEMB_MODEL": model} if model != DEFAULT_MODEL else {}),
    }


# The instance settings shipped at the repository root (no telemetry, runs launched without the daemon's queue).
_SHIPPED_INSTANCE_CONFIG = Path(__file__).resolve().parents[1] / "dagster.yaml"


def prepare_dagster_home(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        config.write_text(_SHIPPED_INSTANCE_CONFIG.read_text())


def register_partitions(instance: dg.DagsterInstance, raw_images_uri: str) -> list[str]:
    # The demo's root holds first-level folders only: the default scheme's partitions are its folders.
    prefixes = PartitionedRoot(open_object_store(raw_images_uri), PartitionScheme()).current_partitions()
    register_prefixes(instance, prefixes)
    return prefixes


def materialize_all(instance: dg.DagsterInstance, prefixes: list[str]) -> list[dg.ExecuteInProcessResult]:
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


def embedding_throughput(results: list[dg.ExecuteInProcessResult]) -> tuple[int, int, float]:
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


def check_lines(results: list[dg.ExecuteInProcessResult]) -> list[str]:
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
    lake: Lake, dataset: SampleDataset, results: list[dg.ExecuteInProcessResult], env: dict[str, str], wall_s: float
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
    if "IMGEMB_MODEL" in env:
        weights = f"{env['IMGEMB_MODEL']}, {weights}"
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
    for line in zero_shot_lines(lake):
        print(line)
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


def zero_shot_lines(lake: Lake) -> list[str]:
    """Each prefix's zero-shot agreement beside its kNN agreement, from the evaluation table; none without one."""
    scored = pl.read_delta(lake.table_uri(tables.EMBEDDING_EVALUATION)).filter(
        pl.col("zero_shot_agreement").is_not_null()
    )
    if scored.is_empty():
        return []

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    first = scored.row(0, named=True)
    caveat = " (noise: random weights)" if scored["weights_are_random"].any() else ""
    lines = [
        f"Zero-shot categories: each image labelled by the nearest of {first['zero_shot_classes']} prompts "
        f"'a photo of a <{first['label_column']}>', against its {first['label_column']}{caveat}:"
    ]
    for row in scored.sort(tables.PARTITION_COLUMN, "model_id").iter_rows(named=True):
        lines.append(
            f"  {row[tables.PARTITION_COLUMN]:12s} zero-shot agreement {shown(row['zero_shot_agreement'])} "
            f"(chance {shown(row['zero_shot_agreement_chance'])}), kNN agreement {shown(row['knn_agreement'])} "
            f"(chance {shown(row['knn_agreement_chance'])})  {row['model_id']}"
        )
    return lines


def search_index_line(results: list[dg.ExecuteInProcessResult]) -> str:
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
    parser.add_argument(
        "--model",
        choices=BACKBONES,
        default=None,
        help=f"the backbone (default: IMGEMB_MODEL if set, else {DEFAULT_MODEL}); clip_vit_b_32 adds zero-shot scores",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model = args.model or os.environ.get("IMGEMB_MODEL") or DEFAULT_MODEL
    if model not in BACKBONES:
        parser.error(f"IMGEMB_MODEL={model!r} is none of {', '.join(BACKBONES)}")
    data_dir = args.data_dir.resolve()
    weights, fell_back_to_random = choose_weights(os.environ, model)
    dataset = generate_sample_dataset(data_dir, images_per_prefix=args.images_per_prefix)
    if fell_back_to_random:
        print(random_weights_banner(model), file=sys.stderr, flush=True)
    env = demo_environment(data_dir, dataset, weights, model)
    os.environ.update(env)  # read by Dagster's EnvVar when each run starts
    os.environ["IMGEMB_MODEL"] = model  # read when the location loads; in `env` (printed) unless the default
    write_env_file(data_dir / "demo.env", env)
    prepare_dagster_home(Path(env["DAGSTER_HOME"]))
    with dg.DagsterInstance.get() as instance:
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
