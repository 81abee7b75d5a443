"""The discovery sensor: new prefixes, changed objects under a prefix, prefixes that vanished.

It registers new prefixes as partitions and reports a new materialization of the
external asset `raw_images` (one per prefix whose listing changed), with the
listing's fingerprint; declarative automation (`location/automation.py`) then
materializes what became stale, in runs of many prefixes. The one exception is a
new prefix: the sensor launches its whole chain itself, in the tick that registers
it (`new_prefix_runs.py`), so nothing waits for the next automation evaluation.
The sales files have a sensor of their own (`sales/sensor.py`).

A fingerprint is reported only when it differs from the last one reported
(kept in the instance as that report's metadata, not in the cursor) or, for a
prefix never reported (a new sensor on an existing instance), the one the
prefix's last manifest recorded. Starting the daemon on an up-to-date instance
therefore reports nothing and launches nothing.

The sensor also notices registered prefixes that vanished from the root, and
reports them or requests their removal (`vanished_prefixes.py`).
"""

from collections.abc import Mapping, Sequence

import dagster as dg

from imgemb_assets.core.ingest.discovery import (
    DiscoveryCursor,
    KnownPrefixes,
    plan_discovery,
    vanished_prefixes,
)
from imgemb_assets.core.ingest.notifications import acknowledge, drain_queue, partitions_touched, sqs_client
from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.ingest.jobs import new_prefixes_job
from imgemb_assets.dagster_wiring.ingest.new_prefix_runs import new_prefix_run_requests, sales_readiness
from imgemb_assets.dagster_wiring.ingest.vanished_prefixes import (
    removal_refusal,
    removal_request,
    remove_vanished_prefixes_job,
    shown,
)
from imgemb_assets.dagster_wiring.location.partitions import s3_prefix_partitions
from imgemb_assets.dagster_wiring.location.recorded_metadata import recorded_fingerprints
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.location.settings import DEFAULT_MINIMUM_INTERVAL_S, LocationSettings
from imgemb_assets.dagster_wiring.names import (
    LISTING_FINGERPRINT_KEY,
    RAW_IMAGES,
    S3_EVENTS_KEY,
    S3_PREFIX_PARTITIONS_NAME,
)

# The location's defaults (IMGEMB_SENSOR_*), for sensors built without settings.
DEFAULT_RECENT_PREFIXES: int = LocationSettings.model_fields["sensor_recent_prefixes"].default
DEFAULT_MAX_NEW_PREFIXES: int = LocationSettings.model_fields["sensor_max_new_prefixes"].default
DEFAULT_MAX_ROOT_PAGES: int = LocationSettings.model_fields["sensor_max_root_pages"].default
DEFAULT_MAX_PARTITIONS_PER_RUN: int = LocationSettings.model_fields["max_partitions_per_run"].default
_ROOT_OBJECTS_SHOWN = 10


def known_prefixes(instance: dg.DagsterInstance, registered: Sequence[str]) -> KnownPrefixes:
    """The registered prefixes, each with the fingerprint of its last `raw_images` report, else of its last manifest.

    The manifest's fingerprint stands in for a prefix never reported (a sensor
    started on an instance whose partitions were materialized from the CLI), so
    starting the daemon on an up-to-date instance reports nothing. A prefix that is
    not registered (new, or removed and uploaded again) is always reported.
    """

    def fingerprints_of(prefixes: Sequence[str]) -> dict[str, str]:
        reported = recorded_fingerprints(instance, RAW_IMAGES, LISTING_FINGERPRINT_KEY, prefixes)
        unreported = [prefix for prefix in prefixes if prefix not in reported]
        return reported | recorded_fingerprints(
            instance, tables.RAW_IMAGE_MANIFEST, LISTING_FINGERPRINT_KEY, unreported
        )

    return KnownPrefixes(frozenset(registered), fingerprints_of)


def report_changed_listings(instance: dg.DagsterInstance, changed: Mapping[str, str]) -> None:
    """Report `raw_images` changed for these partitions (-> new fingerprint), as the sensor does, from outside a tick."""
    for prefix, fingerprint in sorted(changed.items()):
        instance.report_runless_asset_event(_raw_images_changed(prefix, fingerprint))


def _raw_images_changed(prefix: str, fingerprint: str) -> dg.AssetMaterialization:
    return dg.AssetMaterialization(
        asset_key=RAW_IMAGES, partition=prefix, metadata={LISTING_FINGERPRINT_KEY: fingerprint}
    )


def build_raw_prefix_sensor(
    minimum_interval_seconds: int = DEFAULT_MINIMUM_INTERVAL_S,
    recent_prefixes: int = DEFAULT_RECENT_PREFIXES,
    max_new_prefixes: int = DEFAULT_MAX_NEW_PREFIXES,
    vanished_policy: str = "keep",
    events_queue_url: str | None = None,
    max_root_pages: int | None = DEFAULT_MAX_ROOT_PAGES,
    max_partitions_per_run: int = DEFAULT_MAX_PARTITIONS_PER_RUN,
) -> dg.SensorDefinition:
    """The discovery sensor; its interval, the recent prefixes it re-lists, the new ones it takes per tick, what
    becomes of vanished prefixes (`keep` or `remove`) and the SQS queue of the bucket's events are settings.

    With a queue (`IMGEMB_S3_EVENTS_QUEUE_URL`), a tick lists nothing: it reads the S3 event
    notifications waiting there, registers and reports the partitions their keys fall in, then
    deletes the messages (see `_tick_from_events`).
    """

    @dg.sensor(
        name="raw_prefix_sensor",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=[remove_vanished_prefixes_job, new_prefixes_job],
        description=(
            "Registers new prefixes of the raw-images root as s3_prefix partitions and reports raw_images changed "
            f"for every new or changed prefix (re-lists new prefixes and the {recent_prefixes} most recent ones); "
            "automation materializes them."
        ),
    )
    def raw_prefix_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
        # The cursor holds only the vanished prefixes last reported: what the sensor knows
        # of each prefix is in the instance (see known_prefixes).
        last = DiscoveryCursor.from_json(context.cursor)
        last_vanished = last.vanished
        registered = context.instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)
        # The lake's scheme is checked by the manifest step and `imgemb discover`, not here: reading Delta
        # tables inside the code server's sensor evaluation is left out (dagster dev on an S3 lake then
        # did not stop on SIGTERM in full CI runs; unconfirmed cause).
        if events_queue_url:
            return _tick_from_events(
                context, storage, events_queue_url, registered, context.cursor, max_partitions_per_run
            )
        known = known_prefixes(context.instance, registered)
        plan = plan_discovery(
            storage.partitioned_root(),
            known,
            recent=recent_prefixes,
            max_new=max_new_prefixes,
            max_root_pages=max_root_pages,
            loose_pass=last.loose_pass,
        )
        _report_root_objects(context, plan.root_objects)
        _report_unusable_prefixes(context, plan.refused_prefixes, plan.listing_errors)
        vanished = vanished_prefixes(registered, plan.listed_prefixes)
        if tuple(vanished) != last_vanished:
            _report_vanished(context, vanished, len(registered), vanished_policy)
        removable = vanished_policy == "remove" and vanished and removal_refusal(vanished, len(registered)) is None
        return dg.SensorResult(
            run_requests=([removal_request(vanished)] if removable else [])
            + _new_prefix_runs(context, plan.new_prefixes, max_partitions_per_run),
            dynamic_partitions_requests=(
                [s3_prefix_partitions.build_add_request(plan.new_prefixes)] if plan.new_prefixes else []
            ),
            asset_events=[
                _raw_images_changed(prefix, fingerprint) for prefix, fingerprint in sorted(plan.changed.items())
            ],
            cursor=DiscoveryCursor(vanished=tuple(vanished), loose_pass=plan.loose_pass).to_json(),
        )

    return raw_prefix_sensor


def _new_prefix_runs(context: dg.SensorEvaluationContext, new: Sequence[str], max_per_run: int) -> list[dg.RunRequest]:
    """The runs of the new prefixes' chain this tick launches (see new_prefix_runs.py), logged."""
    if not new:
        return []
    readiness = sales_readiness(context.instance)
    requests = new_prefix_run_requests(new, max_per_run, readiness)
    if requests:
        context.log.info(
            f"{len(new)} new prefixes: {len(requests)} runs of their whole chain launched ({readiness.reason})"
        )
    else:
        context.log.info(f"{len(new)} new prefixes left to automation: {readiness.reason}")
    return requests


def _tick_from_events(
    context: dg.SensorEvaluationContext,
    storage: StorageResource,
    queue_url: str,
    registered: Sequence[str],
    cursor: str | None,
    max_partitions_per_run: int,
) -> dg.SensorResult:
    """A discovery tick that lists nothing: the partitions touched by the queued S3 events are registered and reported.

    A reported partition carries no listing fingerprint (nothing was listed): the manifest step
    records the real one, which the reconciliation sensor compares with later. The messages are
    deleted once the result is built; a tick that fails before sees them again after their
    visibility timeout, and whatever the queue never held the reconciliation finds.
    """
    scheme = storage.scheme()
    client = sqs_client(storage.s3.settings(), queue_url)
    drained = drain_queue(client, queue_url, storage.raw_images_uri)
    touched = partitions_touched(drained.changed, scheme.partition_of)
    if touched.uncovered:
        context.log.warning(uncovered_objects_line(list(touched.uncovered_sample), touched.uncovered))
    if drained.malformed:
        context.log.warning(f"{drained.malformed} queued messages were no S3 event this tick; deleted unread")
    known = set(registered)
    new = [key for key in touched.counts if key not in known]
    result = dg.SensorResult(
        dynamic_partitions_requests=[s3_prefix_partitions.build_add_request(new)] if new else [],
        run_requests=_new_prefix_runs(context, new, max_partitions_per_run),
        asset_events=[
            dg.AssetMaterialization(asset_key=RAW_IMAGES, partition=key, metadata={S3_EVENTS_KEY: count})
            for key, count in touched.counts.items()
        ],
        cursor=cursor,  # the vanished prefixes need a listing: left as the last listing tick found them
    )
    acknowledge(client, queue_url, drained)
    context.log.info(
        f"{drained.messages_read} queued S3 events: {len(touched.counts)} partitions touched, {len(new)} new"
        + (" (more waiting: taken next tick)" if drained.more_waiting else "")
    )
    return result


def _report_root_objects(context: dg.SensorEvaluationContext, names: Sequence[str]) -> None:
    """One line per tick, however many there are."""
    if names:
        context.log.warning(uncovered_objects_line(names))


def uncovered_objects_line(names: Sequence[str], count: int | None = None) -> str:
    """The one line that summarises the objects the partition scheme puts in no partition (`count` of them, names
    a sample of them when given)."""
    count = len(names) if count is None else count
    shown = ", ".join(names[:_ROOT_OBJECTS_SHOWN]) + (" ..." if count > min(len(names), _ROOT_OBJECTS_SHOWN) else "")
    return (
        f"{count} objects lie above the partition folders and the partition scheme puts them in no "
        f"partition (IMGEMB_PARTITION_SCHEME's loose:0): {shown}"
    )


def _report_vanished(
    context: dg.SensorEvaluationContext, vanished: Sequence[str], registered: int, policy: str
) -> None:
    """Said once per change of the set of vanished prefixes, not on every tick."""
    if not vanished:
        context.log.info("no registered prefix is missing from the root any more")
        return
    what = f"{len(vanished)} registered prefixes hold no object under the root any more: {shown(vanished)}"
    if policy == "keep":
        context.log.warning(
            f"{what}; they stay registered and the reconciliation empties their partitions "
            "(IMGEMB_VANISHED_PREFIXES=remove removes them from every table and the instance)"
        )
    elif (refusal := removal_refusal(vanished, registered)) is not None:
        context.log.error(f"{what}; {refusal}")
    else:
        context.log.warning(f"{what}; requesting their removal from every table and the instance")


def _report_unusable_prefixes(
    context: dg.SensorEvaluationContext, refused: Mapping[str, str], listing_errors: Mapping[str, str]
) -> None:
    for name, reason in sorted(refused.items()):
        context.log.warning(f"prefix {name!r} is not registered and its objects are in no partition: {reason}")
    for prefix, error in sorted(listing_errors.items()):
        context.log.warning(f"prefix {prefix!r} could not be listed this tick (tried again next tick): {error}")
