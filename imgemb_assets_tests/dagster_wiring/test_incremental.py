"""Incremental embeddings: unchanged images keep their vectors; a sales change rewrites sales columns
without a forward pass; a model change or a changed image goes through the model again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, REJOIN_JOB_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions

defs = build_definitions(LocationSettings())


def _embed(instance: DagsterInstance, prefix: str, job: str = PREFIX_JOB_NAME) -> dict:
    """Runs a job for one partition; the embedding materialization's metadata."""
    assert defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=prefix).success
    event = instance.get_latest_materialization_event(AssetKey(tables.IMAGE_EMBEDDINGS))
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def _embeddings(tmp_path: Path, prefix: str) -> pa.Table:
    return Lake(str(tmp_path / "lake")).read(tables.IMAGE_EMBEDDINGS, prefix).sort_by("image_id")


def test_rematerializing_a_complete_partition_runs_no_forward_pass(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path
) -> None:
    prefix = own_dataset.prefixes[0]
    first = _embed(own_instance, prefix)
    assert first["images_embedded"] == own_dataset.expected_joined(prefix) and first["images_reused"] == 0
    before = _embeddings(tmp_path, prefix)
    again = _embed(own_instance, prefix)
    assert again["images_embedded"] == 0
    assert again["images_reused"] == own_dataset.expected_joined(prefix)
    assert again["weights"] == "model not loaded: every vector was reused"
    assert _embeddings(tmp_path, prefix).equals(before)


def test_a_sales_change_rewrites_sales_columns_without_a_forward_pass(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path
) -> None:
    prefix = own_dataset.prefixes[0]
    _embed(own_instance, prefix)
    before = _embeddings(tmp_path, prefix)
    sales_file = Path(own_dataset.sales_uri) / "sales.parquet"
    sales = pq.read_table(sales_file)
    pq.write_table(sales.set_column(1, "sales", pc.add(sales.column("sales"), 1_000_000)), sales_file)
    assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_instance).success
    metadata = _embed(own_instance, prefix, job=REJOIN_JOB_NAME)
    assert metadata["images_embedded"] == 0
    after = _embeddings(tmp_path, prefix)
    assert after.column("image_id").equals(before.column("image_id"))
    assert pc.all(pc.equal(after.column("sales"), pc.add(before.column("sales"), 1_000_000))).as_py()
    assert after.column("embedding").equals(before.column("embedding"))


def test_a_changed_image_alone_goes_through_the_model(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path
) -> None:
    prefix = own_dataset.prefixes[0]
    _embed(own_instance, prefix)
    before = {row["image_id"]: row["embedding"] for row in _embeddings(tmp_path, prefix).to_pylist()}
    image_id = sorted(before)[0]
    (path,) = [p for p in (Path(own_dataset.raw_images_uri) / prefix).iterdir() if p.stem == image_id]
    other = next(
        p
        for p in (Path(own_dataset.raw_images_uri) / own_dataset.prefixes[1]).iterdir()
        if p.suffix == path.suffix and p.stem.startswith("img_")
    )
    shutil.copyfile(other, path)  # new content under the same name
    metadata = _embed(own_instance, prefix)
    assert metadata["images_embedded"] == 1
    after = {row["image_id"]: row["embedding"] for row in _embeddings(tmp_path, prefix).to_pylist()}
    assert after[image_id] != before[image_id]
    assert all(after[key] == before[key] for key in before if key != image_id)


def test_changing_the_weights_recomputes_every_vector(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = own_dataset.prefixes[0]
    _embed(own_instance, prefix)
    monkeypatch.setenv("IMGEMB_MODEL_WEIGHTS", "random:1")
    metadata = _embed(own_instance, prefix)
    assert metadata["images_embedded"] == own_dataset.expected_joined(prefix)
    assert metadata["images_reused"] == 0
    assert set(_embeddings(tmp_path, prefix).column("model_id").to_pylist()) == {
        "torchvision/resnet50/random-seed1/fp32"
    }
