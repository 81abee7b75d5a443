"""The lake_maintenance job run by Dagster on a small real lake: observations on each table's asset, the guard
against other runs in progress, the schedule (off by default) and its settings."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    build_schedule_context,
    instance_for_test,
)
from deltalake import write_deltalake

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.maintenance import MaintenanceSettings
from imgemb_assets.dagster_wiring.lake.maintenance import maintenance_op_name
from imgemb_assets.dagster_wiring.location.settings import LocationSettings, SettingsError
from imgemb_assets.dagster_wiring.names import GUARD_OP_NAME, MAINTENANCE_JOB_NAME, MAINTENANCE_SCHEDULE_NAME
from imgemb_assets.definitions import build_definitions

PREFIX = "2026-11-01"
STORAGE_COLUMN = tables.PARTITION_STORAGE_COLUMN
# Aged orphans are past this retention; everything the tests write is not.
SETTINGS = LocationSettings(compact_min_files=3, vacuum_retention_hours=1, vacuum_allow_short_retention=True)


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lake:
    """The location's IMGEMB_* roots pointing at tmp_path; rejected_images with a many-file partition and an
    aged orphan, sales in one file, the other tables not written yet."""
    for key, value in {
        "IMGEMB_RAW_IMAGES_URI": str(tmp_path / "raw"),
        "IMGEMB_SALES_URI": str(tmp_path / "sales-export"),
        "IMGEMB_LAKE_URI": str(tmp_path / "lake"),
        "IMGEMB_MODEL_WEIGHTS": "random",
    }.items():
        monkeypatch.setenv(key, value)
    lake = Lake(str(tmp_path / "lake"))
    for n in range(5):
        ids = [f"{PREFIX}-{n}"]
        rows = pa.table({"image_id": ids, "prefix": [PREFIX], "uri": ids, "reason": ["r"], STORAGE_COLUMN: [PREFIX]})
        write_deltalake(lake.table_uri(tables.REJECTED_IMAGES), rows, mode="append", partition_by=[STORAGE_COLUMN])
    lake.overwrite(tables.SALES, pa.table({"image_id": ["a"], "sales": [1.0]}))
    return lake


def _orphan(lake: Lake) -> Path:
    """A data file as a killed write leaves it: in the partition's folder, never committed, two days old."""
    folder = Path(lake.table_uri(tables.REJECTED_IMAGES)) / f"{STORAGE_COLUMN}={PREFIX}"
    path = folder / f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
    pq.write_table(pa.table({"image_id": ["lost"], "prefix": [PREFIX]}), path)
    two_days_ago = time.time() - 2 * 86_400
    os.utime(path, (two_days_ago, two_days_ago))
    return path


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _busy_run(instance: DagsterInstance, job_name: str = "embed_prefix") -> DagsterRun:
    """A run of this instance in progress, as the run storage records it."""
    return instance.add_run(DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED))


def test_the_job_maintains_every_existing_table_and_reports_on_its_asset(lake: Lake, instance: DagsterInstance) -> None:
    orphan = _orphan(lake)
    orphan_bytes = orphan.stat().st_size
    rows = sorted(lake.read(tables.REJECTED_IMAGES).to_pylist(), key=str)

    result = build_definitions(SETTINGS).resolve_job_def(MAINTENANCE_JOB_NAME).execute_in_process(instance=instance)

    assert result.success
    observed = {
        event.asset_key.to_user_string(): event.event_specific_data.asset_observation.metadata
        for event in result.get_asset_observation_events()
    }
    assert set(observed) == {tables.REJECTED_IMAGES, tables.SALES}  # the tables not written yet are skipped
    rejected = {key: value.value for key, value in observed[tables.REJECTED_IMAGES].items()}
    assert rejected["files_before"] == 5 and rejected["files_after"] == 1
    compacted = (rejected["partitions_compacted"], rejected["files_compacted_away"], rejected["files_compacted_into"])
    assert compacted == (1, 5, 1)
    assert (rejected["files_vacuumed"], rejected["bytes_vacuumed"]) == (1, orphan_bytes)
    assert rejected["checkpoint_version"] == rejected["version_before"] + 1
    assert rejected["vacuum_retention_hours"] == 1 and rejected["seconds"] >= 0
    sales = {key: value.value for key, value in observed[tables.SALES].items()}
    keys = ("files_before", "files_after", "partitions_compacted", "files_vacuumed")
    assert [sales[key] for key in keys] == [1, 1, 0, 0]
    assert not orphan.exists()
    assert sorted(lake.read(tables.REJECTED_IMAGES).to_pylist(), key=str) == rows
    # on the asset's page: an observation, never a materialization (automation must not take it for new rows)
    stored = instance.fetch_observations(AssetKey(tables.REJECTED_IMAGES), limit=1).records
    assert stored[0].asset_observation.metadata["files_after"].value == 1
    assert instance.get_latest_materialization_event(AssetKey(tables.REJECTED_IMAGES)) is None


def test_the_job_refuses_to_run_beside_another_run(lake: Lake, instance: DagsterInstance) -> None:
    orphan = _orphan(lake)
    files = lake.partition_files(tables.REJECTED_IMAGES, PREFIX)
    writer = _busy_run(instance)
    job = build_definitions(SETTINGS).resolve_job_def(MAINTENANCE_JOB_NAME)

    result = job.execute_in_process(instance=instance, raise_on_error=False)

    assert not result.success
    failure = result.failure_data_for_node(GUARD_OP_NAME)
    assert failure is not None
    assert writer.run_id in failure.error.message and "ignore_active_runs" in failure.error.message
    assert result.get_asset_observation_events() == []
    assert lake.partition_files(tables.REJECTED_IMAGES, PREFIX) == files and orphan.exists()  # nothing touched

    forced = job.execute_in_process(
        instance=instance, run_config={"ops": {GUARD_OP_NAME: {"config": {"ignore_active_runs": True}}}}
    )
    assert forced.success and not orphan.exists()
    assert len(lake.partition_files(tables.REJECTED_IMAGES, PREFIX)) == 1


def test_each_table_is_its_own_step_in_the_runs_process() -> None:
    job = build_definitions(SETTINGS).resolve_job_def(MAINTENANCE_JOB_NAME)
    assert job.executor_def.name == "in_process"
    table_ops = {maintenance_op_name(name) for name in (*tables.ALL_TABLES, *tables.DERIVED_TABLES)}
    assert {node.name for node in job.nodes} == {GUARD_OP_NAME} | table_ops


def test_the_schedule_is_off_by_default_and_skips_ticks_while_runs_are_in_progress(instance: DagsterInstance) -> None:
    schedule = build_definitions(LocationSettings()).resolve_schedule_def(MAINTENANCE_SCHEDULE_NAME)
    assert schedule.default_status == DefaultScheduleStatus.STOPPED
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 3 * * *", "UTC")
    assert schedule.job_name == MAINTENANCE_JOB_NAME

    idle = schedule.evaluate_tick(build_schedule_context(instance=instance))
    assert [type(request) for request in idle.run_requests or []] == [RunRequest]

    writer = _busy_run(instance)
    busy = schedule.evaluate_tick(build_schedule_context(instance=instance))
    assert not busy.run_requests
    assert busy.skip_message is not None and writer.run_id in busy.skip_message

    custom_defs = build_definitions(LocationSettings(maintenance_cron="30 2 * * 0"))
    custom = custom_defs.resolve_schedule_def(MAINTENANCE_SCHEDULE_NAME)
    assert custom.cron_schedule == "30 2 * * 0"


def test_the_maintenance_settings_come_from_the_environment() -> None:
    settings = LocationSettings.from_environ(
        {
            "IMGEMB_MAINTENANCE_CRON": "0 4 * * 6",
            "IMGEMB_COMPACT_MIN_FILES": "8",
            "IMGEMB_COMPACT_TARGET_FILE_BYTES": "1048576",
            "IMGEMB_VACUUM_RETENTION_HOURS": "24",
            "IMGEMB_VACUUM_ALLOW_SHORT_RETENTION": "true",
        }
    )
    assert settings.maintenance_cron == "0 4 * * 6"
    assert (settings.compact_min_files, settings.compact_target_file_bytes) == (8, 1 << 20)
    assert (settings.vacuum_retention_hours, settings.vacuum_allow_short_retention) == (24, True)
    with pytest.raises(SettingsError, match="IMGEMB_VACUUM_ALLOW_SHORT_RETENTION"):
        LocationSettings.from_environ({"IMGEMB_VACUUM_RETENTION_HOURS": "24"})
    with pytest.raises(SettingsError, match="IMGEMB_VACUUM_ALLOW_SHORT_RETENTION"):
        LocationSettings.from_environ({"IMGEMB_VACUUM_ALLOW_SHORT_RETENTION": "maybe"})
    # the location's defaults are the core's (both take them from core/lake/maintenance_defaults.py)
    defaults, core = LocationSettings(), MaintenanceSettings()
    assert (defaults.compact_min_files, defaults.compact_target_file_bytes, defaults.vacuum_retention_hours) == (
        core.compact_min_files,
        core.target_file_bytes,
        core.vacuum_retention_hours,
    )
