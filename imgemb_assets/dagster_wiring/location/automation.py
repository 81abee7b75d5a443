"""When assets run on their own: Dagster's declarative automation, evaluated by one sensor.

The sensors only notice what only we can see (new prefixes, changed objects,
changed sales files) and report it: they register partitions and record a new
materialization of the external assets `raw_images` (per prefix) and
`sales_export`. (The one run a sensor launches itself is the chain of the
prefixes it registers: `ingest/new_prefix_runs.py`. These conditions then find those
partitions in progress, and afterwards written after their report.) Everything
else follows from these conditions:

- a partition is *stale* from the moment it appears or one of its upstream
  tables (or its source) changes, until it is itself updated. Being requested
  does not end it: a run that fails in any step leaves every partition it did
  not update stale, so nothing is left behind by a failure in between;
- a stale partition is requested once none of its upstream tables is missing
  or in progress, it is not in progress itself, and the blocking
  `unique_image_ids` check on `sales` passes (a sales export with duplicated
  ids re-joins nothing until it is fixed);
- a stale partition whose latest run failed is requested again on each tick of
  the retry cron (hourly by default), not on every evaluation: a failure that
  needs a person (a bad weights file) costs one run an hour, not one a minute;
- one evaluation requests every stale level of a partition: a table whose
  upstream table is requested on this evaluation is requested with it, so a
  partition's whole chain goes out at once, in one run (or one backfill whose
  runs take the chain together), not one level per evaluation.

A partition that is up to date is never requested, so starting the daemon on
an existing instance launches nothing. The automation sensor emits backfills,
which honour the assets' `BackfillPolicy`: N stale prefixes become
ceil(N / max_partitions_per_run) runs. The UI's automation page shows, per
partition, which of these conditions held.
"""

from typing import Final

import dagster as dg

from imgemb_assets.dagster_wiring.names import AUTOMATION_SENSOR_NAME

DEFAULT_RETRY_FAILED_CRON: Final = "0 * * * *"

STALE_LABEL: Final = "stale: missing, or an upstream changed since its last update"

_NOT_BUSY: Final = ~dg.AutomationCondition.in_progress() & ~dg.AutomationCondition.any_deps_in_progress()

# Stale from the latest change of an upstream table (or source) until an update later than it.
# Each side of `since` is a bare operand (or one dep operator over one), so Dagster
# compares the events' own times when both land between two evaluations: a run that
# writes a table and then its downstream table leaves neither stale (the downstream
# update is later), while an upstream change reported after the downstream update keeps
# it stale. An AND or OR around them would drop those times, and Dagster's
# `executed_with_root_target` (which `any_deps_updated` uses) sees only an asset's
# single latest partition: after one run of many prefixes, every other prefix of the
# chain came out stale again and ran twice. An upstream table rewritten while a downstream
# step still reads its old rows is the writes' concern, not this rule's: each commit checks
# that the partition it read is unchanged (Lake.unchanged_since) and retries otherwise.
_UPDATED: Final = dg.AutomationCondition.newly_updated()
_UPSTREAM_UPDATED: Final = dg.AutomationCondition.any_deps_match(dg.AutomationCondition.newly_updated())
_STALE: Final = (dg.AutomationCondition.newly_missing().since(_UPDATED) | _UPSTREAM_UPDATED.since(_UPDATED)).with_label(
    STALE_LABEL
)
# An upstream table requested on this evaluation makes this one stale once it updates:
# request it now, so a new or changed prefix's whole chain goes out in one evaluation
# (one run per prefix, or one backfill whose runs take the chain together).
_UPSTREAM_REQUESTED_NOW: Final = dg.AutomationCondition.any_deps_match(
    dg.AutomationCondition.will_be_requested()
).with_label("an upstream table is requested on this evaluation")


def _retry_due(retry_failed_cron: str) -> dg.AutomationCondition:
    return (
        ~dg.AutomationCondition.execution_failed()
        # Dagster types cron_tick_passed for asset keys and since_last_handled for any key: the same at run time
        | dg.AutomationCondition.cron_tick_passed(retry_failed_cron).since_last_handled()  # type: ignore[misc, operator]
    ).with_label(f"not failed, or failed and the retry cron {retry_failed_cron!r} ticked")


def follows_source(retry_failed_cron: str = DEFAULT_RETRY_FAILED_CRON) -> dg.AutomationCondition:
    """For tables read from a source (external assets: nothing materializes them, sensors report them)."""
    return (_STALE & _retry_due(retry_failed_cron) & _NOT_BUSY).with_label("stale, and its source is readable")


def follows_upstream(retry_failed_cron: str = DEFAULT_RETRY_FAILED_CRON) -> dg.AutomationCondition:
    """For tables computed from other tables."""
    return (
        (_STALE | _UPSTREAM_REQUESTED_NOW)
        & _retry_due(retry_failed_cron)
        & ~dg.AutomationCondition.any_deps_missing()
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
        & _NOT_BUSY
    ).with_label("stale, and its upstream tables are ready")


FOLLOWS_SOURCE: Final = follows_source()
FOLLOWS_UPSTREAM: Final = follows_upstream()


def build_automation_sensor(minimum_interval_seconds: int) -> dg.AutomationConditionSensorDefinition:
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR_NAME,
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=minimum_interval_seconds,
        # One backfill per tick for many partitions: chunked by the assets' BackfillPolicy.
        emit_backfills=True,
        description="Materializes what is missing or stale (see imgemb_assets/dagster_wiring/automation.py).",
    )
