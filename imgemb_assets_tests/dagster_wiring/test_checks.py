"""Asset checks run with the materializations and fail on partitions that violate them."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    ExecuteInProcessResult,
    evaluate_automation_conditions,
)
from PIL import Image
from torchvision.models import resnet18

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset, generate_sample_dataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_instance

defs = build_definitions(LocationSettings())


def _checks(result: ExecuteInProcessResult) -> dict[str, bool]:
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}


def test_checks_pass_on_a_clean_partition(
    own_sales_instance: DagsterInstance, own_sales_dataset: SampleDataset
) -> None:
    assert _checks(defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_sales_instance)) == {
        "unique_image_ids": True
    }
    result = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
        instance=own_sales_instance, partition_key=own_sales_dataset.prefixes[0]
    )
    assert _checks(result) == {
        "manifest_accounted_for": True,
        "sales_coverage": True,
        "embedding_values": True,
        "embedding_drift": True,  # the first partition: nothing to compare with
    }


def test_duplicate_sales_ids_fail_the_blocking_check(
    own_sales_instance: DagsterInstance, own_sales_dataset: SampleDataset
) -> None:
    path = Path(own_sales_dataset.sales_uri) / "sales.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 3)]), path)
    result = defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_sales_instance, raise_on_error=False)
    assert _checks(result) == {"unique_image_ids": False}
    (evaluation,) = result.get_asset_check_evaluations()
    assert "3 image_ids appear more than once" in evaluation.description


def test_low_sales_coverage_warns(own_sales_instance: DagsterInstance, own_sales_dataset: SampleDataset) -> None:
    defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_sales_instance)
    strict = {"resources": {"quality": {"config": {"min_sales_coverage": 0.99}}}}
    result = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
        instance=own_sales_instance, partition_key=own_sales_dataset.prefixes[0], run_config=strict
    )
    assert _checks(result)["sales_coverage"] is False


def test_non_finite_embeddings_fail_the_check(
    own_sales_instance: DagsterInstance, own_sales_dataset: SampleDataset, tmp_path: Path
) -> None:
    broken = resnet18(weights=None)
    with torch.no_grad():
        broken.conv1.weight.fill_(float("nan"))
    torch.save(broken.state_dict(), tmp_path / "nan.pt")
    defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_sales_instance)
    nan_weights = {"model": "resnet18", "weights": str(tmp_path / "nan.pt")}
    with_resnet18 = {"resources": {"embedding_model": {"config": nan_weights}}}
    result = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
        instance=own_sales_instance,
        partition_key=own_sales_dataset.prefixes[0],
        run_config=with_resnet18,
        raise_on_error=False,
    )
    assert _checks(result)["embedding_values"] is False


def _drift(result: ExecuteInProcessResult) -> AssetCheckEvaluation:
    (drift,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "embedding_drift"]
    return drift


def test_drift_check_compares_with_the_previous_partition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition like the previous one passes; one whose photos all became the same grey frame fails."""
    # enough images per partition for the check to judge (min_vectors_for_drift, 30)
    dataset = generate_sample_dataset(tmp_path / "data", images_per_prefix=36, prefixes=("2026-10-01", "2026-10-02"))
    resnet18_random = {"resources": {"embedding_model": {"config": {"model": "resnet18", "weights": "random"}}}}
    first, second = dataset.prefixes
    with code_location_instance(dataset, tmp_path / "lake", monkeypatch) as instance:
        defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance)
        embed = defs.resolve_job_def(PREFIX_JOB_NAME)
        embed.execute_in_process(instance=instance, partition_key=first, run_config=resnet18_random)
        alike = _drift(embed.execute_in_process(instance=instance, partition_key=second, run_config=resnet18_random))
        assert alike.passed, alike.description
        assert alike.metadata["previous_partition"].value == first
        assert alike.metadata["vectors"].value >= 30

        for path in (Path(dataset.raw_images_uri) / second).rglob("*.jpg"):
            Image.new("RGB", (320, 240), (128, 128, 128)).save(path, format="JPEG")
        collapsed = _drift(
            embed.execute_in_process(instance=instance, partition_key=second, run_config=resnet18_random)
        )
    assert not collapsed.passed
    assert collapsed.severity == AssetCheckSeverity.WARN
    assert "variance shift" in collapsed.description and "mean shift" in collapsed.description


def _requested_joins(instance: DagsterInstance, cursor: object) -> tuple[list[str], object]:
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
    return sorted(result.get_requested_partitions(AssetKey(tables.IMAGES_WITH_SALES))), result.cursor


def test_after_duplicate_sales_ids_no_partition_is_joined_or_rejoined(
    own_sales_instance: DagsterInstance, own_sales_dataset: SampleDataset
) -> None:
    first = own_sales_dataset.prefixes[0]
    defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_sales_instance)
    for prefix in own_sales_dataset.prefixes:
        defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(instance=own_sales_instance, partition_key=prefix)
    _, cursor = _requested_joins(own_sales_instance, None)
    # A clean sales refresh re-joins every joined prefix (automation, no vector recomputed).
    defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_sales_instance)
    rejoined, cursor = _requested_joins(own_sales_instance, cursor)
    assert rejoined == own_sales_dataset.prefixes
    joined_before = Lake(os.environ["IMGEMB_LAKE_URI"]).read(tables.IMAGES_WITH_SALES, first)

    path = Path(own_sales_dataset.sales_uri) / "sales.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 3)]), path)
    defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_sales_instance, raise_on_error=False)

    # The blocking check failed: automation joins nothing with it.
    assert _requested_joins(own_sales_instance, cursor)[0] == []
    rerun = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
        instance=own_sales_instance, partition_key=first, raise_on_error=False
    )
    assert not rerun.success
    (failure,) = [e for e in rerun.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert failure.step_key == tables.IMAGES_WITH_SALES
    assert "3 image_ids appear more than once" in failure.step_failure_data.error.message
    assert Lake(os.environ["IMGEMB_LAKE_URI"]).read(tables.IMAGES_WITH_SALES, first).equals(joined_before)
