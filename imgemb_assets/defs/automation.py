"""When assets run on their own: Dagster's declarative automation, evaluated by one sensor.

The sensors only notice what only we can see (new prefixes, changed objects,
changed sales files) and report it: they register partitions and record a new
materialization of the external assets `raw_images` (per prefix) and
`sales_export`. Everything else follows from these conditions:

- `raw_image_manifest` and `sales` run when their source was reported changed,
  and a newly registered prefix runs once;
- every table below them runs when one of its upstream tables was updated,
  once none of its upstream tables is missing or in progress, and only while
  the blocking `unique_image_ids` check on `sales` passes (a sales export with
  duplicated ids re-joins nothing until it is fixed).

A partition that is up to date is never requested, so starting the daemon on
an existing instance launches nothing. The automation sensor emits backfills,
which honour the assets' `BackfillPolicy`: N changed prefixes become
ceil(N / max_partitions_per_run) runs.
"""

from typing import Final

from dagster import AssetSelection, AutomationCondition, AutomationConditionSensorDefinition, DefaultSensorStatus

AUTOMATION_SENSOR_NAME: Final = "imgemb_automation"

_NOT_BUSY: Final = ~AutomationCondition.in_progress() & ~AutomationCondition.any_deps_in_progress()

# Sources are external assets: nothing materializes them, sensors report them.
FOLLOWS_SOURCE: Final = (
    (AutomationCondition.newly_missing() | AutomationCondition.any_deps_updated()).since_last_handled() & _NOT_BUSY
).with_label("missing, or its source was reported changed")

# Tables computed from other tables.
FOLLOWS_UPSTREAM: Final = (
    (AutomationCondition.newly_missing() | AutomationCondition.any_deps_updated()).since_last_handled()
    & ~AutomationCondition.any_deps_missing()
    & AutomationCondition.all_deps_blocking_checks_passed()
    & _NOT_BUSY
).with_label("an upstream table was updated")


def build_automation_sensor(minimum_interval_seconds: int) -> AutomationConditionSensorDefinition:
    return AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR_NAME,
        target=AssetSelection.all(),
        default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=minimum_interval_seconds,
        # One backfill per tick for many partitions: chunked by the assets' BackfillPolicy.
        emit_backfills=True,
        description="Materializes what is missing or stale (see imgemb_assets/defs/automation.py).",
    )
