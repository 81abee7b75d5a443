"""A prefix deleted from the root: with IMGEMB_VANISHED_PREFIXES=keep it is reported and stays registered; with
`remove` the discovery sensor requests remove_vanished_prefixes, which takes its rows out of every table and the
partition and its history out of the instance, leaving the other prefix untouched. A root that suddenly lists
almost nothing removes nothing, and a removed prefix that comes back is registered again. The UI's partition
status (Dagster's status cache) counts only the prefixes left.

Real Delta tables and a real instance; the prefixes are materialized by in-process runs of the location's job."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import AssetKey, DagsterInstance, RunRequest, SensorResult, build_sensor_context
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

from imgemb_assets.core.ingest.discovery import DiscoveryCursor
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.search.index.persistence import load_index
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import build_raw_prefix_sensor
from imgemb_assets.dagster_wiring.ingest.vanished_prefixes import PARTITIONED_TABLES
from imgemb_assets.dagster_wiring.location.partitions import s3_prefix_partitions
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import (
    PREFIX_JOB_NAME,
    REMOVE_VANISHED_JOB_NAME,
    S3_PREFIX_PARTITIONS_NAME,
    SEARCH_INDEX_JOB_NAME,
)
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import store_sensor_result

defs = build_definitions(LocationSettings())


def _storage(dataset: SampleDataset, lake: Path) -> StorageResource:
    return StorageResource(
        raw_images_uri=dataset.raw_images_uri, sales_uri=dataset.sales_uri, lake_uri=str(lake), s3=ImgembS3Resource()
    )


class SensorLog(logging.Handler):
    """What a sensor tick said through its logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.levelno, record.getMessage()))

    def said(self, level: int, text: str) -> list[str]:
        return [message for levelno, message in self.messages if levelno == level and text in message]


def _tick(
    instance: DagsterInstance, storage: StorageResource, cursor: str | None, policy: str, log: SensorLog | None = None
) -> SensorResult:
    with build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as context:
        if log is not None:
            context.log.addHandler(log)  # the tick's own logger, which the daemon would keep with the tick
        result = build_raw_prefix_sensor(vanished_policy=policy)(context)
    assert isinstance(result, SensorResult)
    store_sensor_result(instance, result)
    return result


def _materialized_in_the_ui(instance: DagsterInstance, asset: AssetKey) -> list[str]:
    """The materialized partitions the UI counts: Dagster's partition status cache, which the webserver reads."""
    with partition_loading_context(dynamic_partitions_store=instance):
        cached = get_and_update_asset_status_cache_value(instance, asset, s3_prefix_partitions)
        subset = cached.get_materialized_subset(instance, asset, s3_prefix_partitions)
        return sorted(subset.expensively_compute_partition_keys())


def _rows_by_table(lake: Lake, prefix: str) -> dict[str, int]:
    return {name: lake.read(name, prefix).num_rows for name in PARTITIONED_TABLES}


@pytest.fixture
def materialized(own_dataset: SampleDataset, own_instance: DagsterInstance) -> SampleDataset:
    for prefix in own_dataset.prefixes:
        assert (
            defs.resolve_job_def(PREFIX_JOB_NAME)
            .execute_in_process(instance=own_instance, partition_key=prefix)
            .success
        )
    assert defs.resolve_job_def(SEARCH_INDEX_JOB_NAME).execute_in_process(instance=own_instance).success
    return own_dataset


def test_a_vanished_prefix_is_removed_from_every_table_and_the_instance(
    small_dataset: SampleDataset, materialized: SampleDataset, own_instance: DagsterInstance, tmp_path: Path
) -> None:
    gone, kept = materialized.prefixes
    storage = _storage(materialized, tmp_path / "lake")
    lake = storage.lake()
    cursor = _tick(own_instance, storage, None, "remove").cursor
    kept_rows = _rows_by_table(lake, kept)
    # The kept prefix's pairs with an image of the removed one go with it; its other pairs stay.
    kept_pairs = lake.read(tables.NEAR_DUPLICATES, kept).to_pylist()
    kept_rows[tables.NEAR_DUPLICATES] = sum(pair["other_prefix"] != gone for pair in kept_pairs)
    assert kept_rows[tables.NEAR_DUPLICATES] < len(kept_pairs)  # the sample has pairs across the two prefixes
    # Every table holds rows of both prefixes (near duplicates only where the sample has some).
    for rows in (_rows_by_table(lake, gone), kept_rows):
        assert all(count for name, count in rows.items() if name != tables.NEAR_DUPLICATES), rows

    shutil.rmtree(Path(materialized.raw_images_uri) / gone)
    result = _tick(own_instance, storage, cursor, "remove")
    (request,) = result.run_requests
    assert isinstance(request, RunRequest) and request.job_name == REMOVE_VANISHED_JOB_NAME
    assert DiscoveryCursor.from_json(result.cursor).vanished == (gone,)

    run = defs.resolve_job_def(REMOVE_VANISHED_JOB_NAME).execute_in_process(
        instance=own_instance, run_config=request.run_config
    )
    assert run.success
    assert _rows_by_table(lake, gone) == {name: 0 for name in PARTITIONED_TABLES}
    assert _rows_by_table(lake, kept) == kept_rows
    assert own_instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME) == [kept]
    for name in PARTITIONED_TABLES:
        if name != tables.NEAR_DUPLICATES:  # one Dagster asset for all prefixes, as the search index is
            assert _materialized_in_the_ui(own_instance, AssetKey(name)) == [kept], name
    (output,) = [e for e in run.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    reported = output.step_output_data.metadata
    assert reported["prefixes_removed"].value == [gone]
    assert reported[f"rows_removed/{tables.IMAGE_EMBEDDINGS}"].value == materialized.expected_joined(gone)
    # The search index follows at its next refresh.
    assert defs.resolve_job_def(SEARCH_INDEX_JOB_NAME).execute_in_process(instance=own_instance).success
    assert set(load_index(lake, "torchvision/resnet50/random-seed0/fp32").fingerprints()) == {kept}

    # The next tick requests nothing more; the prefix, uploaded again, is new again.
    after = _tick(own_instance, storage, result.cursor, "remove")
    assert after.run_requests == [] and DiscoveryCursor.from_json(after.cursor).vanished == ()
    shutil.copytree(Path(small_dataset.raw_images_uri) / gone, Path(materialized.raw_images_uri) / gone)
    back = _tick(own_instance, storage, after.cursor, "remove")
    (added,) = back.dynamic_partitions_requests
    assert list(added.partition_keys) == [gone]
    # Reported changed although its listing equals the one reported before removal: its tables are empty now.
    assert [event.partition for event in back.asset_events] == [gone]


def test_with_keep_a_vanished_prefix_is_reported_once_and_stays_registered(
    own_dataset: SampleDataset, own_instance: DagsterInstance, tmp_path: Path
) -> None:
    gone, kept = own_dataset.prefixes
    storage = _storage(own_dataset, tmp_path / "lake")
    cursor = _tick(own_instance, storage, None, "keep").cursor
    shutil.rmtree(Path(own_dataset.raw_images_uri) / gone)
    sensor_log = SensorLog()
    first = _tick(own_instance, storage, cursor, "keep", sensor_log)
    second = _tick(own_instance, storage, first.cursor, "keep", sensor_log)
    assert first.run_requests == [] and second.run_requests == []
    assert sorted(own_instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)) == sorted([gone, kept])
    warnings = sensor_log.said(logging.WARNING, "hold no object under the root")
    assert len(warnings) == 1 and repr(gone) in warnings[0] and "stay registered" in warnings[0]


def test_a_root_listing_almost_nothing_removes_nothing(
    own_dataset: SampleDataset, own_instance: DagsterInstance, tmp_path: Path
) -> None:
    storage = _storage(own_dataset, tmp_path / "lake")
    cursor = _tick(own_instance, storage, None, "remove").cursor
    for prefix in own_dataset.prefixes:  # as an unmounted disk or a wrong root would look
        shutil.rmtree(Path(own_dataset.raw_images_uri) / prefix)
    sensor_log = SensorLog()
    result = _tick(own_instance, storage, cursor, "remove", sensor_log)
    assert result.run_requests == []
    assert sensor_log.said(logging.ERROR, "looks like a wrong root")
    assert sorted(own_instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)) == sorted(own_dataset.prefixes)


def _pair(prefix: str, image_id: str, other_prefix: str, other_id: str) -> dict[str, object]:
    return {
        "image_id": image_id,
        "prefix": prefix,
        "other_image_id": other_id,
        "other_prefix": other_prefix,
        "similarity": 0.99,
        "same_partition": prefix == other_prefix,
        "model_id": "torchvision/resnet50/random-seed0/fp32",
    }


def test_a_removed_prefix_takes_the_pairs_pointing_at_it_from_the_prefixes_kept(
    materialized: SampleDataset, own_instance: DagsterInstance, tmp_path: Path
) -> None:
    gone, kept = materialized.prefixes
    storage = _storage(materialized, tmp_path / "lake")
    lake = storage.lake()
    # Near duplicates across the two prefixes and inside the kept one, as a refresh writes them.
    kept_pairs = [_pair(kept, "k1", gone, "g1"), _pair(kept, "k2", kept, "k3")]
    lake.write_partition(
        tables.NEAR_DUPLICATES, pa.Table.from_pylist(kept_pairs, schema=tables.NEAR_DUPLICATES_SCHEMA), kept
    )
    lake.write_partition(
        tables.NEAR_DUPLICATES,
        pa.Table.from_pylist([_pair(gone, "g1", kept, "k1")], schema=tables.NEAR_DUPLICATES_SCHEMA),
        gone,
    )
    cursor = _tick(own_instance, storage, None, "remove").cursor
    shutil.rmtree(Path(materialized.raw_images_uri) / gone)
    (request,) = _tick(own_instance, storage, cursor, "remove").run_requests
    run = defs.resolve_job_def(REMOVE_VANISHED_JOB_NAME).execute_in_process(
        instance=own_instance, run_config=request.run_config
    )
    assert run.success
    left = lake.read(tables.NEAR_DUPLICATES).to_pylist()
    assert [(row["prefix"], row["image_id"], row["other_prefix"]) for row in left] == [(kept, "k2", kept)]
