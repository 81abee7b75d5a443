"""One step, many partitions: each prefix written in its own commit, with its own events.

A run launched for a range of prefixes (a backfill under the assets'
`BackfillPolicy`, declarative automation, `imgemb backfill-missing`) executes
each step once for the whole range, so imports, resources and the model are
paid once per run. Each prefix is still its own unit of work: it is written in
its own Delta commit and gets its own materialization event, metadata and check
results, so reruns and partial failures stay per prefix.

Dagster turns a step's output into one materialization per partition of the
run's range, and only when the step succeeds. So when every prefix succeeded,
the step returns its outputs and attaches each prefix's metadata to that
prefix's event (`add_asset_metadata(partition_key=...)`); when some failed, it
reports the prefixes that succeeded one by one (`AssetMaterialization(partition=...)`,
which counts for the backfill and for automation like any other) and then fails,
naming the prefixes that did not. A failed prefix never stops the others.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from imgemb_assets.core.quality.checks import CheckOutcome
from imgemb_assets.core.storage.s3 import S3AccessDenied
from imgemb_assets.dagster_wiring.location.retries import permanent_failures
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME

_FAILURES_SHOWN: Final = 10


@dataclass(frozen=True)
class CheckReport:
    """One asset check's outcome on one prefix."""

    name: str
    outcome: CheckOutcome
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR


@dataclass(frozen=True)
class AssetReport:
    """What writing one prefix of one asset produced: its event metadata and its checks."""

    asset: str
    metadata: Mapping[str, Any]
    checks: Sequence[CheckReport] = field(default_factory=tuple)


PrefixWork = Callable[[str], Sequence[AssetReport]]
StepEvent = dg.MaterializeResult | dg.AssetMaterialization | dg.AssetCheckEvaluation | dg.Output


class PrefixesFailed(Exception):
    """Some prefixes of the step's range failed (each for a reason a retry may change); the rest were written."""


def materialize_prefixes(context: dg.AssetExecutionContext, work: PrefixWork) -> Iterator[StepEvent]:
    """Runs `work` for every prefix of the step's range and yields Dagster's events for each prefix."""
    prefixes = list(context.partition_keys)
    reports: dict[str, Sequence[AssetReport]] = {}
    failures: dict[str, Exception] = {}
    for prefix in prefixes:
        try:
            with permanent_failures():
                reports[prefix] = work(prefix)
        except Exception as exc:  # one prefix's failure must not cost the others their work
            if _refuses_every_prefix(exc):
                # S3 denying the lake fails each prefix alike: the refusal alone is the step's failure.
                yield from _reported_one_by_one(context.instance, reports)
                raise
            context.log.exception(f"prefix {prefix!r} failed: {exc}")
            failures[prefix] = exc
    for prefix in [prefix for prefix in reports if not _still_registered(context.instance, prefix)]:
        # Removed after its commit: Dagster takes no event for a deleted partition, and the removal
        # waited for this run to end before deleting what it wrote.
        del reports[prefix]
        failures[prefix] = dg.Failure(
            description=f"prefix {prefix!r} was removed (remove_vanished_prefixes) while this run wrote it; "
            "what it wrote is deleted with it",
            allow_retries=False,
        )
    if failures:
        yield from _reported_one_by_one(context.instance, reports)
        raise _failure_naming(failures, len(prefixes))
    yield from _reported_with_outputs(context, reports)


def _still_registered(instance: dg.DagsterInstance, prefix: str) -> bool:
    return instance.has_dynamic_partition(S3_PREFIX_PARTITIONS_NAME, prefix)


def _refuses_every_prefix(error: Exception) -> bool:
    return isinstance(error, dg.Failure) and isinstance(error.__cause__, S3AccessDenied)


def _reported_with_outputs(
    context: dg.AssetExecutionContext, reports: Mapping[str, Sequence[AssetReport]]
) -> Iterator[StepEvent]:
    for prefix, report in _each_report(reports):
        context.add_asset_metadata(dict(report.metadata), asset_key=report.asset, partition_key=prefix)
    for asset_key in context.selected_asset_keys:
        yield dg.MaterializeResult(asset_key=asset_key)
    yield from _check_evaluations(context.instance, reports)
    # A check's output must be emitted even though its results are reported per prefix above.
    for output_name in context.assets_def.check_specs_by_output_name:
        yield dg.Output(None, output_name=output_name)


def _reported_one_by_one(
    instance: dg.DagsterInstance, reports: Mapping[str, Sequence[AssetReport]]
) -> Iterator[StepEvent]:
    for prefix, report in _each_report(reports):
        yield dg.AssetMaterialization(asset_key=report.asset, partition=prefix, metadata=dict(report.metadata))
    yield from _check_evaluations(instance, reports)


def _check_evaluations(
    instance: dg.DagsterInstance, reports: Mapping[str, Sequence[AssetReport]]
) -> Iterator[dg.AssetCheckEvaluation]:
    """Each prefix's check results, tied to the materialization just reported (as the UI expects)."""
    for prefix, report in _each_report(reports):
        target = _latest_materialization(instance, report.asset, prefix) if report.checks else None
        for check in report.checks:
            yield dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey(report.asset),
                check_name=check.name,
                passed=check.outcome.passed,
                severity=check.severity,
                description=check.outcome.description,
                metadata=check.outcome.metadata,
                target_materialization_data=target,
                partition=prefix,
            )


def _each_report(reports: Mapping[str, Sequence[AssetReport]]) -> Iterator[tuple[str, AssetReport]]:
    for prefix, asset_reports in reports.items():
        for report in asset_reports:
            yield prefix, report


def _latest_materialization(
    instance: dg.DagsterInstance, asset: str, prefix: str
) -> AssetCheckEvaluationTargetMaterializationData | None:
    # The events yielded before this point are already stored: a step's events are
    # written as it yields them.
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[prefix]), limit=1
    ).records
    if not records:
        return None
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=records[0].storage_id, run_id=records[0].run_id, timestamp=records[0].timestamp
    )


def _failure_naming(failures: Mapping[str, Exception], total: int) -> Exception:
    shown = "; ".join(f"{prefix}: {_reason(exc)}" for prefix, exc in list(failures.items())[:_FAILURES_SHOWN])
    more = f"; and {len(failures) - _FAILURES_SHOWN} more" if len(failures) > _FAILURES_SHOWN else ""
    message = (
        f"{len(failures)} of {total} prefixes failed and were not written: {shown}{more}. "
        f"The other {total - len(failures)} were written and reported."
    )
    retryable = [exc for exc in failures.values() if not (isinstance(exc, dg.Failure) and not exc.allow_retries)]
    if retryable:
        return PrefixesFailed(message)
    return dg.Failure(description=message, metadata={"failed_prefixes": sorted(failures)}, allow_retries=False)


def _reason(exc: Exception) -> str:
    return exc.description if isinstance(exc, dg.Failure) and exc.description else f"{type(exc).__name__}: {exc}"
