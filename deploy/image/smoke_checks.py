"""Checks that smoke_test.sh runs INSIDE the built image, with the image's own Python and packages.

    python smoke_checks.py imports                       the libraries the shipped deploy configs name
    python smoke_checks.py instance                      $DAGSTER_HOME/dagster.yaml loads, with its classes
    python smoke_checks.py dataset DIR N                 a sample dataset of N images per prefix in DIR
    python smoke_checks.py verify DIR N PREFIX           PREFIX's embeddings are in the lake and the instance

Each prints what it found and exits non-zero (an AssertionError) when something is off. Mounted
read-only into the container; not part of the image.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path


def imports() -> None:
    # deploy/ecs/dagster.yaml: dagster_postgres storage, dagster_aws.ecs launcher; deploy/k8s/values.yaml:
    # dagster_k8s; IMGEMB_EXECUTOR=celery: dagster_celery (and its redis client); psycopg2: dagster_postgres' driver.
    for name in ("dagster_postgres", "dagster_aws.ecs", "dagster_k8s", "dagster_celery", "redis", "psycopg2", "torch"):
        module = importlib.import_module(name)
        version = getattr(module, "__version__", "") or getattr(sys.modules[name.split(".")[0]], "__version__", "")
        print(f"  import {name:18s} ok {version}")
    import torch

    print(f"  torch CUDA build: {torch.version.cuda or 'none (CPU-only)'}")


def instance() -> None:
    from dagster import DagsterInstance

    config = Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml"
    with DagsterInstance.get() as loaded:
        found = {
            "run storage": type(loaded.run_storage).__name__,
            "event log storage": type(loaded.event_log_storage).__name__,
            "schedule storage": type(loaded.schedule_storage).__name__,
            # The launcher and coordinator are built lazily: touching them is what instantiates them.
            "run launcher": type(loaded.run_launcher).__name__,
            "run coordinator": type(loaded.run_coordinator).__name__,
        }
        runs = loaded.get_runs_count()  # a real query against the storage
    print(f"  {config} loaded:")
    for what, cls in found.items():
        print(f"    {what:18s} {cls}")
    print(f"    runs stored       {runs}")
    assert found["run storage"] == "PostgresRunStorage", found
    assert found["event log storage"] == "PostgresEventLogStorage", found
    assert found["schedule storage"] == "PostgresScheduleStorage", found
    assert found["run launcher"] == "EcsRunLauncher", found
    assert found["run coordinator"] == "QueuedRunCoordinator", found


def dataset(root: str, images_per_prefix: str) -> None:
    from imgemb_assets.core.sample.dataset import generate_sample_dataset

    made = generate_sample_dataset(Path(root), images_per_prefix=int(images_per_prefix))
    for prefix in made.prefixes:
        print(
            f"  {prefix}: {len(made.image_ids[prefix])} images, {len(made.broken_files[prefix])} broken files, "
            f"{made.expected_joined(prefix)} with a sales row"
        )


def verify(root: str, images_per_prefix: str, prefix: str) -> None:
    import pyarrow.compute as pc
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus

    from imgemb_assets.core.lake import tables
    from imgemb_assets.core.lake.lake import Lake
    from imgemb_assets.core.sample.dataset import generate_sample_dataset

    made = generate_sample_dataset(Path(root), images_per_prefix=int(images_per_prefix))  # reuses it
    lake = Lake(os.environ["IMGEMB_LAKE_URI"])
    embedded = lake.read(tables.IMAGE_EMBEDDINGS)
    per_prefix = embedded.group_by("prefix").aggregate([]).column("prefix").to_pylist()
    rows = embedded.filter(pc.equal(embedded["prefix"], prefix))
    widths = set(pc.list_value_length(rows["embedding"]).to_pylist())
    models = set(rows["model_id"].to_pylist())
    print(
        f"  {lake.table_uri(tables.IMAGE_EMBEDDINGS)}: {rows.num_rows} rows for {prefix} "
        f"(expected {made.expected_joined(prefix)}), vector width {widths}, model_id {models}, prefixes {per_prefix}"
    )
    assert rows.num_rows == made.expected_joined(prefix) > 0
    assert per_prefix == [prefix], "exactly one partition was materialized"
    assert widths == {2048}, widths  # ResNet50's pooled features
    assert all("random" in model for model in models), models  # the weights the smoke test configured

    with DagsterInstance.get() as loaded:
        runs = loaded.get_runs()
        statuses = [run.status for run in runs]
        records = loaded.fetch_materializations(AssetKey(tables.IMAGE_EMBEDDINGS), limit=10).records
        partitions = [record.partition_key for record in records]
        storage = type(loaded.event_log_storage).__name__
    print(
        f"  instance ({storage}): runs {[status.value for status in statuses]}, "
        f"image_embeddings materializations for {partitions}"
    )
    assert statuses == [DagsterRunStatus.SUCCESS], statuses
    assert partitions == [prefix], partitions


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"imports": imports, "instance": instance, "dataset": dataset, "verify": verify}[command](*arguments)
