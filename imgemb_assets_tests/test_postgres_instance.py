"""The Dagster instance stored in a real PostgreSQL server (dagster-postgres), as deploy/ecs/dagster.yaml
stores it: the README's user command embeds every prefix, the partitions, runs and materializations land
in PostgreSQL, `imgemb status` reads them back, and a discovery sensor tick and an automation evaluation
on that instance request nothing once it is up to date."""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg2
import pytest
import yaml
from dagster import (
    AssetKey,
    DagsterInstance,
    SensorResult,
    SkipReason,
    build_sensor_context,
    evaluate_automation_conditions,
)

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.ingest.discovery_sensor import build_raw_prefix_sensor
from imgemb_assets.dagster_wiring.location.resources import ImgembS3Resource, StorageResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import RAW_IMAGES, S3_PREFIX_PARTITIONS_NAME, SEARCH_INDEX
from imgemb_assets.dagster_wiring.sales.sensor import build_sales_change_sensor
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import REPO_ROOT, code_location_env, run_readme_backfill, run_user_command, user_shell_env
from imgemb_support.postgres_server import PG_URL_VARIABLE, with_postgres_storage

BIN = Path(sys.executable).parent
PARTITIONED = [name for name in tables.ALL_TABLES if name != tables.SALES]


def _write_postgres_instance(home: Path) -> None:
    """The shipped dagster.yaml (run queue, pools), with its storage in PostgreSQL."""
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(with_postgres_storage(REPO_ROOT / "dagster.yaml")))


def _query(url: str, sql: str) -> list[tuple]:
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        connection.close()


@pytest.mark.slow
def test_the_readme_user_path_on_a_postgres_instance(
    small_dataset: SampleDataset,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "dagster_home"
    _write_postgres_instance(home)
    location = code_location_env(small_dataset, tmp_path / "lake", dagster_home=home) | {PG_URL_VARIABLE: postgres_url}
    env = user_shell_env(location)
    prefixes = small_dataset.prefixes
    imgemb = str(BIN / "imgemb")

    run_readme_backfill(env, prefixes)
    lake = Lake(str(tmp_path / "lake"))
    for prefix in prefixes:
        assert lake.read(tables.IMAGE_EMBEDDINGS, prefix).num_rows == small_dataset.expected_joined(prefix)

    # What the instance holds is in PostgreSQL itself, not in a SQLite file beside dagster.yaml.
    assert not list(home.rglob("*.db")), "the instance fell back to SQLite"
    assert _query(postgres_url, "SELECT partition FROM dynamic_partitions ORDER BY partition") == [
        (p,) for p in prefixes
    ]
    assert _query(postgres_url, "SELECT status FROM runs") == [("SUCCESS",)]
    [(materializations,)] = _query(
        postgres_url, "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
    )
    assert materializations >= len(PARTITIONED) * len(prefixes) + 1, "every table of every prefix, and sales"

    status = run_user_command([imgemb, "status", "--asset", "image_embeddings"], env)
    assert f"image_embeddings: {len(prefixes)} current, 0 missing, 0 stale" in status

    for key, value in location.items():
        monkeypatch.setenv(key, value)
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__module__.startswith("dagster_postgres")
        assert sorted(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)) == prefixes
        for name in PARTITIONED:
            assert instance.get_materialized_partitions(AssetKey(name)) == set(prefixes), name
        _assert_sensors_report_nothing(instance, small_dataset, str(tmp_path / "lake"))

        # A first evaluation (no cursor), as a daemon started on this instance makes it: nothing of the
        # pipeline runs again; what the embeddings are used for (evaluation, search index and its near
        # duplicates), never made by the user's backfill of image_embeddings, is requested.
        defs = build_definitions(LocationSettings())
        evaluation = evaluate_automation_conditions(defs=defs, instance=instance)
        requested = {
            key.to_user_string(): sorted(map(str, evaluation.get_requested_partitions(key)))
            for key in defs.resolve_asset_graph().materializable_asset_keys
            if evaluation.get_num_requested(key)
        }
        assert requested == {
            tables.EMBEDDING_EVALUATION: prefixes,
            SEARCH_INDEX: ["None"],
            tables.NEAR_DUPLICATES: ["None"],
        }


def _assert_sensors_report_nothing(instance: DagsterInstance, dataset: SampleDataset, lake_uri: str) -> None:
    """A fresh discovery tick (no cursor) and a sales tick on the up-to-date instance: no new partition, no change."""
    storage = StorageResource(
        raw_images_uri=dataset.raw_images_uri, sales_uri=dataset.sales_uri, lake_uri=lake_uri, s3=ImgembS3Resource()
    )
    with build_sensor_context(instance=instance, cursor=None, resources={"storage": storage}) as context:
        discovery = build_raw_prefix_sensor()(context)
    assert isinstance(discovery, SensorResult) and discovery.run_requests == []
    # The sensor knows the prefixes from the instance, not its cursor: every one is registered already.
    assert discovery.dynamic_partitions_requests == []
    assert [e.partition for e in discovery.asset_events if e.asset_key.to_user_string() == RAW_IMAGES] == []
    with build_sensor_context(instance=instance, cursor=None, resources={"storage": storage}) as context:
        assert isinstance(build_sales_change_sensor()(context), SkipReason), "sales is up to date"
