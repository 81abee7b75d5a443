"""Sensors (discovery, sales, the rolling reconciliation), evaluated against a real instance and a local root, cursor fed back.

The sensors register prefixes and report the external assets changed; the only runs they launch are
the chains of the prefixes the discovery sensor registers (test_chained_requests.py runs them)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import (
    AssetMaterialization,
    DagsterInstance,
    SensorResult,
    SkipReason,
    build_sensor_context,
    instance_for_test,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from imgemb_assets.core.ingest.discovery import DiscoveryCursor
from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import build_raw_prefix_sensor
from imgemb_assets.dagster_wiring.ingest.reconciliation import build_reconciliation_sensor, next_window
from imgemb_assets.dagster_wiring.location.recorded_metadata import recorded_fingerprint, recorded_fingerprints
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import (
    LISTING_FINGERPRINT_KEY,
    PREFIX_JOB_NAME,
    RAW_IMAGES,
    S3_PREFIX_PARTITIONS_NAME,
    SALES_EXPORT,
    SALES_JOB_NAME,
)
from imgemb_assets.dagster_wiring.sales.sensor import build_sales_change_sensor
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_env, store_sensor_result

defs = build_definitions(LocationSettings())


@pytest.fixture
def raw_root(small_dataset: SampleDataset, tmp_path: Path) -> Path:
    """A private copy of the sample's raw images, free to change."""
    root = tmp_path / "raw-images"
    shutil.copytree(small_dataset.raw_images_uri, root)
    return root


@pytest.fixture
def storage(small_dataset: SampleDataset, raw_root: Path, tmp_path: Path) -> StorageResource:
    return StorageResource(
        raw_images_uri=str(raw_root),
        sales_uri=small_dataset.sales_uri,
        lake_uri=str(tmp_path / "lake"),
        s3=ImgembS3Resource(),
    )


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def _tick(instance: DagsterInstance, storage: StorageResource, cursor: str | None) -> SensorResult:
    with build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
        result = build_raw_prefix_sensor()(context)
    assert isinstance(result, SensorResult)
    store_sensor_result(instance, result)
    return result


def _materialize_sales(
    storage: StorageResource, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch, dataset: SampleDataset
) -> None:
    for key, value in code_location_env(dataset, storage.lake_uri).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IMGEMB_RAW_IMAGES_URI", storage.raw_images_uri)
    assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance).success


def _launched_ranges(result: SensorResult) -> list[tuple[str, str]]:
    return [
        (request.tags[ASSET_PARTITION_RANGE_START_TAG], request.tags[ASSET_PARTITION_RANGE_END_TAG])
        for request in result.run_requests
    ]


def _reported(result: SensorResult) -> list[str]:
    """The prefixes whose raw_images the tick reported changed.

    The only runs a tick launches are those of the prefixes it registered (their whole
    chain, one range of consecutive new prefixes per run): changed ones are automation's.
    """
    registered = [key for request in result.dynamic_partitions_requests for key in request.partition_keys]
    assert _launched_ranges(result) == ([(registered[0], registered[-1])] if registered else [])
    return sorted(event.partition for event in result.asset_events if event.asset_key.to_user_string() == RAW_IMAGES)


def test_first_tick_registers_and_reports_every_prefix_and_the_next_reports_nothing(
    instance: DagsterInstance, storage: StorageResource, small_dataset: SampleDataset
) -> None:
    first = _tick(instance, storage, None)
    (added,) = first.dynamic_partitions_requests
    assert list(added.partition_keys) == small_dataset.prefixes
    assert _reported(first) == small_dataset.prefixes
    assert all(event.metadata[LISTING_FINGERPRINT_KEY].value for event in first.asset_events)

    second = _tick(instance, storage, first.cursor)
    assert _reported(second) == [] and second.dynamic_partitions_requests == []
    # What the sensor knows of each prefix is in the instance; the cursor does not grow with the prefixes.
    assert DiscoveryCursor.from_json(second.cursor) == DiscoveryCursor()


def test_a_changed_prefix_is_reported_again_and_a_new_one_registered(
    instance: DagsterInstance, storage: StorageResource, raw_root: Path, small_dataset: SampleDataset
) -> None:
    cursor = _tick(instance, storage, None).cursor
    changed_prefix = small_dataset.prefixes[0]
    next(p for p in (raw_root / changed_prefix).iterdir() if p.suffix == ".jpg").unlink()
    shutil.copytree(raw_root / changed_prefix, raw_root / "2026-12-01")
    result = _tick(instance, storage, cursor)
    assert _reported(result) == [changed_prefix, "2026-12-01"]
    (added,) = result.dynamic_partitions_requests
    assert list(added.partition_keys) == ["2026-12-01"]


def test_a_new_sensor_on_an_up_to_date_instance_reports_only_what_changed(
    instance: DagsterInstance,
    storage: StorageResource,
    raw_root: Path,
    small_dataset: SampleDataset,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty cursor (a daemon started on an existing instance) must not re-run every prefix."""
    _materialize_sales(storage, instance, monkeypatch, small_dataset)
    instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, small_dataset.prefixes)
    changed = small_dataset.prefixes[1]
    for prefix in small_dataset.prefixes:
        assert defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(instance=instance, partition_key=prefix).success
    (raw_root / changed / "added.jpg").write_bytes(b"any new object changes the listing")
    assert _reported(_tick(instance, storage, None)) == [changed]
    with build_sensor_context(instance=instance, cursor=None, resources={"storage": storage}) as context:
        assert isinstance(build_sales_change_sensor()(context), SkipReason), "sales is up to date"


def test_objects_directly_under_the_root_are_partitions_of_the_default_scheme(
    instance: DagsterInstance, storage: StorageResource, raw_root: Path
) -> None:
    (raw_root / "stray.jpg").write_bytes(b"x")
    bucket = PartitionScheme().partition_of("stray.jpg")
    result = _tick(instance, storage, None)
    assert bucket in instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)
    assert bucket in _reported(result)


def test_loose_objects_left_out_by_the_scheme_are_summarised_in_one_line_per_tick(
    instance: DagsterInstance, storage: StorageResource, raw_root: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    for number in range(200):
        (raw_root / f"stray{number:03d}.jpg").write_bytes(b"x")
    storage = StorageResource(
        raw_images_uri=storage.raw_images_uri,
        sales_uri=storage.sales_uri,
        lake_uri=storage.lake_uri,
        s3=ImgembS3Resource(),
        partition_scheme="folders,loose:0",
    )
    _tick(instance, storage, None)
    output = capfd.readouterr()
    lines = [line for line in (output.err + output.out).splitlines() if "stray" in line]
    assert len(lines) == 1, lines
    assert "200 objects lie above the partition folders and the partition scheme puts them in no partition" in lines[0]
    assert not any(key.startswith("(loose)") for key in instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))


def test_sales_sensor_reports_the_export_only_when_the_files_change(
    instance: DagsterInstance, storage: StorageResource, small_dataset: SampleDataset, tmp_path: Path
) -> None:
    sales_root = tmp_path / "sales"
    shutil.copytree(small_dataset.sales_uri, sales_root)
    storage = StorageResource(
        raw_images_uri=storage.raw_images_uri,
        sales_uri=str(sales_root),
        lake_uri=storage.lake_uri,
        s3=ImgembS3Resource(),
    )

    def tick(cursor: str | None) -> SensorResult | SkipReason:
        with build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
            return build_sales_change_sensor()(context)

    first = tick(None)
    assert isinstance(first, SensorResult) and first.run_requests == []
    assert [event.asset_key.to_user_string() for event in first.asset_events] == [SALES_EXPORT]
    assert isinstance(tick(first.cursor), SkipReason)
    (sales_root / "extra.parquet").write_bytes((sales_root / "sales.parquet").read_bytes())
    assert isinstance(tick(first.cursor), SensorResult)


def _reconcile(instance: DagsterInstance, storage: StorageResource, cursor: str | None, per_tick: int) -> SensorResult:
    sensor_def = build_reconciliation_sensor(minimum_interval_seconds=1, prefixes_per_tick=per_tick)
    with build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
        result = sensor_def(context)
    assert isinstance(result, SensorResult)
    for event in result.asset_events:  # what the daemon stores after the tick
        instance.report_runless_asset_event(event)
    return result


def test_reconciliation_reports_each_registered_prefix_whose_listing_differs_from_the_last_report(
    instance: DagsterInstance, storage: StorageResource, raw_root: Path, small_dataset: SampleDataset
) -> None:
    instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, small_dataset.prefixes)
    first, second = small_dataset.prefixes
    # A bounded share per tick, in name order, wrapping around.
    tick = _reconcile(instance, storage, None, per_tick=1)
    assert (_reported(tick), tick.cursor) == ([first], first)
    tick = _reconcile(instance, storage, tick.cursor, per_tick=1)
    assert (_reported(tick), tick.cursor) == ([second], second)
    assert _reported(_reconcile(instance, storage, tick.cursor, per_tick=2)) == []

    # Upload then delete (A -> A+x -> A): both changes are reported, the revert included.
    added = raw_root / first / "added.jpg"
    added.write_bytes(b"any new object changes the listing")
    assert _reported(_reconcile(instance, storage, None, per_tick=2)) == [first]
    added.unlink()
    assert _reported(_reconcile(instance, storage, None, per_tick=2)) == [first]
    assert _reported(_reconcile(instance, storage, None, per_tick=2)) == []

    # A prefix deleted from the root is reported once, so its partitions empty out.
    shutil.rmtree(raw_root / second)
    assert _reported(_reconcile(instance, storage, None, per_tick=2)) == [second]


def test_the_reconciliation_window_wraps_around_the_registered_prefixes() -> None:
    prefixes = ["a", "b", "c", "d"]
    assert next_window(prefixes, None, 3) == ["a", "b", "c"]
    assert next_window(prefixes, "c", 3) == ["d", "a", "b"]
    assert next_window(prefixes, "zz", 2) == ["a", "b"]  # the cursor's prefix was deregistered
    assert next_window(prefixes, "bb", 10) == ["c", "d", "a", "b"]
    assert next_window([], None, 3) == []


def test_recorded_fingerprints_of_many_prefixes_match_one_by_one(instance: DagsterInstance) -> None:
    instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, ["a", "b", "c", "d"])
    for prefix, fingerprint in (("a", "old"), ("b", "b1"), ("a", "new"), ("c", None)):
        metadata = {} if fingerprint is None else {LISTING_FINGERPRINT_KEY: fingerprint}
        instance.report_runless_asset_event(
            AssetMaterialization(asset_key=RAW_IMAGES, partition=prefix, metadata=metadata)
        )
    window = ["a", "b", "c", "d"]
    batched = recorded_fingerprints(instance, RAW_IMAGES, LISTING_FINGERPRINT_KEY, window)
    one_by_one = {
        p: fp for p in window if (fp := recorded_fingerprint(instance, RAW_IMAGES, LISTING_FINGERPRINT_KEY, p))
    }
    assert batched == one_by_one == {"a": "new", "b": "b1"}
