"""Many prefixes per run: ranges of at most max_partitions_per_run prefixes, each prefix committed and
reported on its own, a failing prefix named and left for the next run while the others are kept."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, instance_for_test

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset, generate_sample_dataset
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.dagster_wiring.backfills import plan_backfill, run_chunks, run_in_process
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_env

PREFIXES = ("2026-09-01", "2026-09-02", "2026-09-03", "2026-09-04", "2026-09-05")
MAX_PER_RUN = 2


@pytest.fixture(scope="module")
def five_prefixes(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    return generate_sample_dataset(tmp_path_factory.mktemp("five"), images_per_prefix=3, prefixes=PREFIXES, seed=3)


@pytest.fixture
def dataset(five_prefixes: SampleDataset, tmp_path: Path) -> SampleDataset:
    """A private copy of the raw images, free to break."""
    shutil.copytree(five_prefixes.raw_images_uri, tmp_path / "raw")
    return replace(five_prefixes, raw_images_uri=str(tmp_path / "raw"))


def _run_backfill(instance: DagsterInstance, dataset: SampleDataset) -> list[bool]:
    defs = build_definitions(LocationSettings(max_partitions_per_run=MAX_PER_RUN))
    plan = plan_backfill(instance, tables.IMAGE_EMBEDDINGS, open_object_store(dataset.sales_uri))
    return [outcome.success for outcome in run_in_process(instance, defs, plan, MAX_PER_RUN)]


def test_a_fresh_lake_takes_ceil_n_over_max_runs_sales_in_the_first_each_prefix_reported(
    dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in code_location_env(dataset, tmp_path / "lake").items():
        monkeypatch.setenv(key, value)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, list(PREFIXES))
        assert _run_backfill(instance, dataset) == [True] * math.ceil(len(PREFIXES) / MAX_PER_RUN)
        runs = instance.get_runs()
        assert len(runs) == math.ceil(len(PREFIXES) / MAX_PER_RUN)
        assert instance.get_latest_materialization_event(AssetKey(tables.SALES)).run_id == runs[-1].run_id
        lake = Lake(os.environ["IMGEMB_LAKE_URI"])
        for prefix in PREFIXES:
            assert lake.read(tables.IMAGE_EMBEDDINGS, prefix).num_rows == dataset.expected_joined(prefix)
        # one materialization event per prefix, with that prefix's own row count
        for asset in (tables.RAW_IMAGE_MANIFEST, tables.DOWNSCALED_IMAGES, tables.IMAGE_EMBEDDINGS):
            events = instance.fetch_materializations(AssetKey(asset), limit=100).records
            assert sorted(e.partition_key for e in events) == sorted(PREFIXES)
        for event in instance.fetch_materializations(AssetKey(tables.IMAGE_EMBEDDINGS), limit=100).records:
            rows = event.asset_materialization.metadata["dagster/row_count"].value
            assert rows == dataset.expected_joined(event.partition_key)
        # and one check evaluation per prefix
        checks = [
            record.event_log_entry.dagster_event.event_specific_data
            for record in instance.get_records_for_run(
                runs[0].run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION
            ).records
        ]
        assert sorted((c.check_name, c.partition) for c in checks if c.check_name == "embedding_values") == [
            ("embedding_values", prefix) for prefix in PREFIXES[-1:]
        ]
        # nothing is left to do
        again = plan_backfill(instance, tables.IMAGE_EMBEDDINGS, open_object_store(dataset.sales_uri))
        assert again.empty


def test_a_failing_prefix_is_named_and_left_for_the_next_run_the_others_are_kept(
    dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in code_location_env(dataset, tmp_path / "lake").items():
        monkeypatch.setenv(key, value)
    broken = PREFIXES[1]
    raw = Path(dataset.raw_images_uri)
    # The prefix's folder was replaced by a link leading out of the root: never followed, a permanent failure.
    shutil.move(raw / broken, tmp_path / "elsewhere")
    (raw / broken).symlink_to(tmp_path / "elsewhere")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, list(PREFIXES))
        outcomes = _run_backfill(instance, dataset)
        assert outcomes == [False, True, True], "only the run holding the broken prefix fails"
        failed_run = next(
            r for r in instance.get_runs() if r.tags.get("dagster/asset_partition_range_start") == PREFIXES[0]
        )
        (failure,) = [
            r.event_log_entry.dagster_event
            for r in instance.get_records_for_run(failed_run.run_id, of_type=DagsterEventType.STEP_FAILURE).records
        ]
        assert failure.step_key == tables.RAW_IMAGE_MANIFEST
        message = failure.step_failure_data.error.message
        assert f"1 of 2 prefixes failed and were not written: {broken}:" in message
        assert "outside" in message
        lake = Lake(os.environ["IMGEMB_LAKE_URI"])
        assert sorted(lake.partition_keys(tables.RAW_IMAGE_MANIFEST)) == sorted(set(PREFIXES) - {broken})
        materialized = instance.get_materialized_partitions(AssetKey(tables.RAW_IMAGE_MANIFEST))
        assert materialized == set(PREFIXES) - {broken}, "the other prefix of the failed run is kept and reported"
        assert instance.get_materialized_partitions(AssetKey(tables.IMAGE_EMBEDDINGS)) == set(PREFIXES[2:])

        (raw / broken).unlink()
        shutil.move(tmp_path / "elsewhere", raw / broken)
        plan = plan_backfill(instance, tables.IMAGE_EMBEDDINGS, open_object_store(dataset.sales_uri))
        assert plan.tables_by_prefix[broken][0] == tables.RAW_IMAGE_MANIFEST
        assert plan.tables_by_prefix[PREFIXES[0]][0] == tables.DOWNSCALED_IMAGES
        assert set(plan.tables_by_prefix) == set(PREFIXES[:2])
        assert all(_run_backfill(instance, dataset))
        for prefix in PREFIXES:
            assert lake.read(tables.IMAGE_EMBEDDINGS, prefix).num_rows == dataset.expected_joined(prefix)


def test_runs_cover_ranges_of_registered_prefixes_that_need_the_same_tables() -> None:
    from imgemb_assets.dagster_wiring.backfills import BackfillPlan

    full = (
        tables.RAW_IMAGE_MANIFEST,
        tables.DOWNSCALED_IMAGES,
        tables.REJECTED_IMAGES,
        tables.IMAGES_WITH_SALES,
        tables.IMAGE_EMBEDDINGS,
    )
    tail = (tables.IMAGE_EMBEDDINGS,)
    plan = BackfillPlan(False, "", {"a": full, "b": full, "c": full, "e": tail, "f": full})
    chunks = run_chunks(plan, ["a", "b", "c", "d", "e", "f"], max_per_run=2)
    assert [(c.prefixes, c.tables) for c in chunks] == [
        (("a", "b"), full),
        (("c",), full),  # "d" needs nothing: a range must not span it
        (("e",), tail),
        (("f",), full),
    ]
