"""A new or changed prefix's whole chain goes out at once, and what ran once is not run again.

Automation is evaluated with Dagster's own tester against a real instance; the runs
are real in-process runs of the location's jobs, selected as a backfill, the
discovery sensor or the UI select them (an asset selection over one range of
prefixes), so the events automation reads are those a daemon would read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, RunRequest, SensorResult, build_sensor_context, instance_for_test
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.dagster_wiring.backfills import plan_backfill
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import build_raw_prefix_sensor
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.names import NEW_PREFIXES_JOB_NAME, PREFIX_CHAIN_ASSETS, SALES_JOB_NAME
from imgemb_assets_tests.dagster_wiring.test_stale_partitions import Ticks, _report_listing, defs
from imgemb_support.location import code_location_env, store_sensor_result


def _requested(ticks: Ticks) -> dict[str, list[str]]:
    """Each chain table's partitions requested by one evaluation (tables with none left out)."""
    requested = {table: ticks.requested(table) for table in PREFIX_CHAIN_ASSETS}
    return {table: prefixes for table, prefixes in requested.items() if prefixes}


def _report_listings(instance: DagsterInstance, dataset: SampleDataset, prefixes: Sequence[str]) -> None:
    """What the discovery sensor reports for each of `prefixes`, new or with a changed listing."""
    for prefix in prefixes:
        _report_listing(instance, Path(dataset.raw_images_uri), prefix)


@pytest.fixture
def ticks(own_instance: DagsterInstance) -> Ticks:
    """Automation's successive evaluations on `own_instance`, none made yet."""
    return Ticks(own_instance)


def _run_range(instance: DagsterInstance, prefixes: Sequence[str], assets: Sequence[str]) -> None:
    """One run of `assets` over the range of `prefixes`, as a backfill chunk or the discovery sensor launches it."""
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        asset_selection=[AssetKey(asset) for asset in assets],
        tags={ASSET_PARTITION_RANGE_START_TAG: prefixes[0], ASSET_PARTITION_RANGE_END_TAG: prefixes[-1]},
        raise_on_error=False,
    )
    assert result.success


def test_one_evaluation_requests_every_level_of_the_new_prefixes_and_one_run_of_them_all_leaves_nothing_to_run(
    own_instance: DagsterInstance, own_dataset: SampleDataset, ticks: Ticks
) -> None:
    prefixes = own_dataset.prefixes
    assert len(prefixes) >= 2  # a run of several prefixes: Dagster's own same-run test saw only the last one
    _report_listings(own_instance, own_dataset, prefixes)
    # Every level of every new prefix in the same evaluation: nothing waits for the level above to run.
    assert _requested(ticks) == {table: prefixes for table in PREFIX_CHAIN_ASSETS}

    _run_range(own_instance, prefixes, PREFIX_CHAIN_ASSETS)
    assert _requested(ticks) == {}
    assert _requested(ticks) == {}


def test_a_chain_run_in_two_runs_with_an_evaluation_between_runs_each_level_once(
    own_instance: DagsterInstance, own_dataset: SampleDataset, ticks: Ticks
) -> None:
    prefixes = own_dataset.prefixes
    _report_listings(own_instance, own_dataset, prefixes)
    _requested(ticks)
    upper, lower = PREFIX_CHAIN_ASSETS[:3], PREFIX_CHAIN_ASSETS[3:]
    _run_range(own_instance, prefixes, upper)  # as a backfill splits a chain at a table of another partitioning
    assert _requested(ticks) == {table: prefixes for table in lower}
    _run_range(own_instance, prefixes, lower)
    assert _requested(ticks) == {}


def test_a_change_reported_after_a_table_was_written_keeps_it_stale_even_between_two_evaluations(
    own_instance: DagsterInstance, own_dataset: SampleDataset, ticks: Ticks
) -> None:
    prefixes = own_dataset.prefixes
    _requested(ticks)
    _run_range(own_instance, prefixes, PREFIX_CHAIN_ASSETS)
    # The listing changes after the run wrote the manifest, before automation looks again: both
    # events fall between the same two evaluations, and the later one (the change) decides.
    changed = prefixes[0]
    _report_listings(own_instance, own_dataset, [changed])
    assert _requested(ticks) == {table: [changed] for table in PREFIX_CHAIN_ASSETS}

    _run_range(own_instance, [changed], PREFIX_CHAIN_ASSETS)
    assert _requested(ticks) == {}
    # A sales refresh re-joins every prefix, and re-embeds them (stored vectors reused).
    assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_instance).success
    assert _requested(ticks) == {table: prefixes for table in PREFIX_CHAIN_ASSETS[3:]}


# --- the discovery sensor launches the chain of the prefixes it registers ---------------------------


@pytest.fixture
def fresh_instance(
    own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterInstance]:
    """An instance with nothing registered and nothing materialized, the location's variables pointing at `own_dataset`."""
    for key, value in code_location_env(own_dataset, tmp_path / "lake").items():
        monkeypatch.setenv(key, value)
    with instance_for_test() as instance:
        yield instance


def _discovery_tick(
    instance: DagsterInstance, own_dataset: SampleDataset, lake: Path, max_per_run: int
) -> SensorResult:
    storage = StorageResource(
        raw_images_uri=own_dataset.raw_images_uri,
        sales_uri=own_dataset.sales_uri,
        lake_uri=str(lake),
        s3=ImgembS3Resource(),
    )
    sensor = build_raw_prefix_sensor(max_partitions_per_run=max_per_run)
    with build_sensor_context(instance=instance, resources={"storage": storage}) as context:
        result = sensor(context)
    assert isinstance(result, SensorResult)
    store_sensor_result(instance, result)
    return result


def _execute(instance: DagsterInstance, request: RunRequest) -> None:
    assert request.job_name == NEW_PREFIXES_JOB_NAME and request.asset_selection is not None
    result = defs.resolve_job_def(NEW_PREFIXES_JOB_NAME).execute_in_process(
        instance=instance, asset_selection=list(request.asset_selection), tags=request.tags, raise_on_error=False
    )
    assert result.success


def test_the_discovery_tick_launches_the_chain_of_the_prefixes_it_registers_and_automation_then_requests_none(
    fresh_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path
) -> None:
    prefixes = own_dataset.prefixes
    result = _discovery_tick(fresh_instance, own_dataset, tmp_path / "lake", max_per_run=1)
    # One run per prefix here (at most max_partitions_per_run each); the first refreshes sales, never materialized.
    assert [
        (r.tags[ASSET_PARTITION_RANGE_START_TAG], r.tags[ASSET_PARTITION_RANGE_END_TAG]) for r in result.run_requests
    ] == [(prefix, prefix) for prefix in prefixes]
    selections = [[key.to_user_string() for key in request.asset_selection or []] for request in result.run_requests]
    assert selections == [[tables.SALES, *PREFIX_CHAIN_ASSETS]] + [list(PREFIX_CHAIN_ASSETS)] * (len(prefixes) - 1)

    ticks = Ticks(fresh_instance)
    for request in result.run_requests:
        _execute(fresh_instance, request)
    # Automation finds every new partition written after its report: nothing more for the chain.
    assert _requested(ticks) == {}
    assert _requested(ticks) == {}
    lake = Lake(str(tmp_path / "lake"))
    for prefix in prefixes:
        assert lake.read(tables.IMAGE_EMBEDDINGS, prefix).num_rows > 0
    # The next tick finds nothing new and launches nothing.
    assert _discovery_tick(fresh_instance, own_dataset, tmp_path / "lake", max_per_run=1).run_requests == []


def test_no_chain_is_launched_while_a_run_refreshes_sales_automation_takes_the_prefixes(
    fresh_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path
) -> None:
    # A queued run of the sales job stands for a refresh in flight.
    sales_job = defs.resolve_job_def(SALES_JOB_NAME)
    fresh_instance.create_run_for_job(sales_job, asset_selection=frozenset({AssetKey(tables.SALES)}))
    result = _discovery_tick(fresh_instance, own_dataset, tmp_path / "lake", max_per_run=32)
    assert result.run_requests == []
    assert [
        key for request in result.dynamic_partitions_requests for key in request.partition_keys
    ] == own_dataset.prefixes


def test_backfill_missing_with_a_daemon_leaves_the_prefixes_a_queued_run_writes_to_it(
    own_instance: DagsterInstance, own_dataset: SampleDataset
) -> None:
    first, *others = own_dataset.prefixes
    sales = open_object_store(own_dataset.sales_uri)
    # A queued run of the first prefix's chain (as the discovery sensor queues it); `sales` is current.
    own_instance.create_run_for_job(
        defs.resolve_job_def(NEW_PREFIXES_JOB_NAME),
        asset_selection=frozenset(AssetKey(asset) for asset in PREFIX_CHAIN_ASSETS),
        tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: first},
    )
    submitted = plan_backfill(own_instance, tables.IMAGE_EMBEDDINGS, sales, skip_unfinished_runs=True)
    assert list(submitted.tables_by_prefix) == others and list(submitted.skipped_in_progress) == [first]
    # In its own process (no daemon to end a run whose process died), the command runs every prefix.
    in_process = plan_backfill(own_instance, tables.IMAGE_EMBEDDINGS, sales)
    assert list(in_process.tables_by_prefix) == own_dataset.prefixes
