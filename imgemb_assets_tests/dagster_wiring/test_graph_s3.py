"""The whole graph on s3:// roots (the moto server subprocess) gives the same tables as on a local folder, odd prefixes included."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import instance_for_test

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, S3_PREFIX_PARTITIONS_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_env, dataset_on_s3

defs = build_definitions(LocationSettings())

ODD_PREFIX = "café ☕ it's+a=b 100%"


def _materialize(dataset: SampleDataset, lake_uri: str, prefixes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in code_location_env(dataset, lake_uri).items():
        monkeypatch.setenv(key, value)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, prefixes)
        assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance).success
        for prefix in prefixes:
            job = defs.resolve_job_def(PREFIX_JOB_NAME)
            assert job.execute_in_process(instance=instance, partition_key=prefix).success


def _comparable(table: pa.Table) -> list[dict]:
    """Rows without the columns that say where the data lives, in a stable order."""
    keep = [column for column in table.column_names if column not in ("uri", "last_modified")]
    return sorted(table.select(keep).to_pylist(), key=lambda row: (row.get("prefix", ""), str(row["image_id"])))


def test_graph_on_s3_matches_a_local_run(
    small_dataset: SampleDataset, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local copy of the sample where the second prefix is renamed to one with odd characters.
    first, source = small_dataset.prefixes
    local_raw = tmp_path / "raw-images"
    shutil.copytree(Path(small_dataset.raw_images_uri) / first, local_raw / first)
    shutil.copytree(Path(small_dataset.raw_images_uri) / source, local_raw / ODD_PREFIX)
    local = replace(small_dataset, raw_images_uri=str(local_raw))
    on_s3 = dataset_on_s3(local, bucket)
    prefixes = [first, ODD_PREFIX]

    _materialize(on_s3, f"s3://{bucket}/delta", prefixes, monkeypatch)
    _materialize(local, str(tmp_path / "lake"), prefixes, monkeypatch)

    s3_lake = Lake(f"s3://{bucket}/delta", storage_options=S3Settings().delta_storage_options())
    local_lake = Lake(str(tmp_path / "lake"))
    assert s3_lake.read(tables.IMAGE_EMBEDDINGS, ODD_PREFIX).num_rows == small_dataset.expected_joined(source)
    assert s3_lake.read(tables.REJECTED_IMAGES, ODD_PREFIX).num_rows == len(small_dataset.broken_files[source])
    manifest_uris = s3_lake.read(tables.RAW_IMAGE_MANIFEST, ODD_PREFIX).column("uri").to_pylist()
    assert all(uri.startswith(f"s3://{bucket}/raw-images/{ODD_PREFIX}/") for uri in manifest_uris)
    for name in tables.ALL_TABLES:
        assert _comparable(s3_lake.read(name)) == _comparable(local_lake.read(name)), name
