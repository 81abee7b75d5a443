"""Lake maintenance as a job: compact, checkpoint and vacuum every table of the lake (core/lake/maintenance.py).

`lake_maintenance` has one op per table, run one after another in the run's
own process whatever the location's executor (the work is delta-rs I/O; a
pod or task per table would only add start-up time). Before them, `no_other_runs`
fails the run while other runs of this instance are starting or running:
compaction must not race the partition writers (delta-rs fails one of the two
commits, and a compacted input makes a writer's precondition abandon its
write). Launch it with `ignore_active_runs: true` where those runs write no
table. What starts after that check is handled per partition by
core/lake/maintenance.py.

Each table's op reports what it did as an `AssetObservation` of the table's
asset, so it shows on the asset's page; an observation is no materialization,
so automation does not take it for new rows.

`lake_maintenance_schedule` is off until it is turned on; a tick while other
runs are in progress is skipped.
"""

from typing import Final

import dagster as dg
from pydantic import Field

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.maintenance import MaintenanceReport, MaintenanceSettings, maintain_table
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import GUARD_OP_NAME, MAINTENANCE_JOB_NAME, MAINTENANCE_SCHEDULE_NAME

# Runs that may be writing now. Queued runs are not: a run queue may hold them for hours.
_BUSY_STATUSES: Final = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)
_RUNS_NAMED: Final = 10
_PATHS_LOGGED: Final = 50


def maintenance_op_name(table: str) -> str:
    return f"maintain_{table}"


def maintenance_settings(location: LocationSettings) -> MaintenanceSettings:
    return MaintenanceSettings(
        compact_min_files=location.compact_min_files,
        target_file_bytes=location.compact_target_file_bytes,
        vacuum_retention_hours=location.vacuum_retention_hours,
        allow_short_retention=location.vacuum_allow_short_retention,
    )


def busy_runs(instance: dg.DagsterInstance, except_run_id: str | None = None) -> list[dg.DagsterRun]:
    """Runs of this instance starting, running or being canceled, but the one named."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=list(_BUSY_STATUSES)), limit=_RUNS_NAMED + 1)
    return [run for run in runs if run.run_id != except_run_id]


def _named(runs: list[dg.DagsterRun]) -> str:
    return ", ".join(f"{run.job_name} ({run.run_id})" for run in runs[:_RUNS_NAMED])


class GuardConfig(dg.Config):
    ignore_active_runs: bool = Field(
        default=False,
        description="Maintain the tables even while other runs are in progress (when none of them writes the lake).",
    )


@dg.op(
    name=GUARD_OP_NAME, out=dg.Out(dg.Nothing), description="Fails while other runs of this instance are in progress."
)
def no_other_runs(context: dg.OpExecutionContext, config: GuardConfig) -> None:
    others = busy_runs(context.instance, context.run_id)
    if not others:
        return
    if config.ignore_active_runs:
        context.log.warning(f"maintaining the lake while other runs are in progress, as asked: {_named(others)}")
        return
    raise dg.Failure(
        description=(
            f"{len(others)}{'+' if len(others) > _RUNS_NAMED else ''} other run(s) in progress: {_named(others)}. "
            "Lake maintenance does not race the partition writers: launch it again when they are done, "
            f"or with ops: {{{GUARD_OP_NAME}: {{config: {{ignore_active_runs: true}}}}}} if none writes the lake."
        ),
        allow_retries=False,
    )


def observation(report: MaintenanceReport, settings: MaintenanceSettings) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=dg.AssetKey(report.table),
        description="lake maintenance: compaction, checkpoint, vacuum",
        metadata={
            "files_before": dg.MetadataValue.int(report.files_before),
            "files_after": dg.MetadataValue.int(report.files_after),
            "partitions_compacted": dg.MetadataValue.int(report.partitions_compacted),
            "partitions_skipped": dg.MetadataValue.int(report.partitions_skipped),
            "files_compacted_away": dg.MetadataValue.int(report.files_compacted_away),
            "files_compacted_into": dg.MetadataValue.int(report.files_compacted_into),
            "files_vacuumed": dg.MetadataValue.int(report.files_vacuumed),
            "bytes_vacuumed": dg.MetadataValue.int(report.bytes_vacuumed),
            "checkpoint_version": dg.MetadataValue.int(report.checkpoint_version),
            "version_before": dg.MetadataValue.int(report.version_before),
            "version_after": dg.MetadataValue.int(report.version_after),
            "vacuum_retention_hours": dg.MetadataValue.int(settings.vacuum_retention_hours),
            "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
        },
    )


def _table_op(name: str, settings: MaintenanceSettings) -> dg.OpDefinition:
    @dg.op(
        name=maintenance_op_name(name),
        ins={"ready": dg.In(dg.Nothing)},
        description=f"Compacts, checkpoints and vacuums the {name} table, if it exists.",
    )
    def maintain(context: dg.OpExecutionContext, storage: StorageResource) -> None:
        lake = storage.lake()
        if not lake.exists(name):
            context.log.info(f"{name}: no table yet, nothing to maintain")
            return
        report = maintain_table(lake, name, settings)
        if report.partitions_skipped:
            context.log.warning(f"{name}: left to the next run, a writer won: {', '.join(report.skipped_partitions)}")
        if report.vacuumed_paths:
            shown = "\n".join(report.vacuumed_paths[:_PATHS_LOGGED])
            more = len(report.vacuumed_paths) - _PATHS_LOGGED
            context.log.info(f"{name}: vacuumed\n{shown}" + (f"\n... and {more} more" if more > 0 else ""))
        context.log_event(observation(report, settings))

    return maintain


def build_maintenance_job(settings: MaintenanceSettings) -> dg.JobDefinition:
    table_ops = [_table_op(name, settings) for name in (*tables.ALL_TABLES, *tables.DERIVED_TABLES)]

    @dg.job(
        name=MAINTENANCE_JOB_NAME,
        executor_def=dg.in_process_executor,
        description=(
            "Compacts partitions with many small files, checkpoints each table's log and vacuums files no version "
            f"within {settings.vacuum_retention_hours} hours references (killed writes' included). "
            "Refuses to start while other runs are in progress."
        ),
    )
    def lake_maintenance() -> None:
        ready = no_other_runs()
        for table_op in table_ops:
            table_op(ready)

    return lake_maintenance


def build_maintenance_schedule(location: LocationSettings) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=MAINTENANCE_SCHEDULE_NAME,
        cron_schedule=location.maintenance_cron,
        execution_timezone="UTC",
        job=build_maintenance_job(maintenance_settings(location)),
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=(
            f"Lake maintenance at {location.maintenance_cron!r} (UTC), skipped while other runs are in progress."
        ),
    )
    def lake_maintenance_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        others = busy_runs(context.instance)
        if others:
            return dg.SkipReason(
                f"other runs are in progress, lake maintenance waits for the next tick: {_named(others)}"
            )
        return dg.RunRequest()

    return lake_maintenance_schedule
