"""Shared fixtures: a small generated sample dataset, the environment that points the code location at it,
and a moto S3 server subprocess with the AWS variables that reach it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
from dagster import AddDynamicPartitionsRequest, AssetMaterialization, DagsterInstance, SensorResult, instance_for_test

from imgemb_assets.core.s3 import S3Settings
from imgemb_assets.core.sample_data import SampleDataset, generate_sample_dataset
from imgemb_assets.core.tables import DOWNSCALED_IMAGES_SCHEMA, REJECTED_IMAGES_SCHEMA
from imgemb_assets.defs.partitions import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets_tests.moto_server import client_environment, running_moto_server

# The real PostgreSQL and Redis server fixtures (postgres_server, postgres_url, redis_url), for any test module.
pytest_plugins = ["imgemb_assets_tests.postgres_server", "imgemb_assets_tests.redis_server"]

SMALL_PREFIXES = ("2026-11-01", "2026-11-02")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    """Two prefixes of eight images each, with the sample's broken files spread over them."""
    return generate_sample_dataset(
        tmp_path_factory.mktemp("sample"), images_per_prefix=8, prefixes=SMALL_PREFIXES, seed=1
    )


def code_location_env(dataset: SampleDataset, lake: str | Path, dagster_home: Path | None = None) -> dict[str, str]:
    """The IMGEMB_* variables (and DAGSTER_HOME) a user sets to run the code location on `dataset`."""
    env = {
        "IMGEMB_RAW_IMAGES_URI": dataset.raw_images_uri,
        "IMGEMB_SALES_URI": dataset.sales_uri,
        "IMGEMB_LAKE_URI": str(lake),
        "IMGEMB_MODEL_WEIGHTS": "random",
    }
    if dagster_home is not None:
        env["DAGSTER_HOME"] = str(dagster_home)
    return env


@contextmanager
def code_location_instance(
    dataset: SampleDataset, lake: str | Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterInstance]:
    """A test instance with the dataset's prefixes registered, the IMGEMB_* variables pointing at it."""
    for key, value in code_location_env(dataset, lake).items():
        monkeypatch.setenv(key, value)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, dataset.prefixes)
        yield instance


@pytest.fixture
def own_sales_dataset(small_dataset: SampleDataset, tmp_path: Path) -> SampleDataset:
    """The small dataset with a copy of its sales export that the test may change."""
    shutil.copytree(small_dataset.sales_uri, tmp_path / "sales")
    return replace(small_dataset, sales_uri=str(tmp_path / "sales"))


@pytest.fixture
def own_sales_instance(
    own_sales_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterInstance]:
    with code_location_instance(own_sales_dataset, tmp_path / "lake", monkeypatch) as instance:
        yield instance


@pytest.fixture
def own_dataset(small_dataset: SampleDataset, tmp_path: Path) -> SampleDataset:
    """The small dataset with private copies of its raw images and sales export, free to change."""
    shutil.copytree(small_dataset.raw_images_uri, tmp_path / "raw")
    shutil.copytree(small_dataset.sales_uri, tmp_path / "sales")
    return replace(small_dataset, raw_images_uri=str(tmp_path / "raw"), sales_uri=str(tmp_path / "sales"))


@pytest.fixture
def own_instance(own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DagsterInstance]:
    """An instance with `own_dataset`'s prefixes registered and its `sales` table materialized (lake in tmp_path)."""
    from imgemb_assets.definitions import build_definitions
    from imgemb_assets.defs.jobs import SALES_JOB_NAME
    from imgemb_assets.defs.settings import LocationSettings

    with code_location_instance(own_dataset, tmp_path / "lake", monkeypatch) as instance:
        sales_job = build_definitions(LocationSettings()).resolve_job_def(SALES_JOB_NAME)
        assert sales_job.execute_in_process(instance=instance).success
        yield instance


def downscaled_rows(prefix: str, ids: list[str]) -> pa.Table:
    """`downscaled_images` rows of one prefix for `ids`, with placeholder pixels: what a join reads."""
    n = len(ids)
    return pa.table(
        {
            "image_id": ids,
            "prefix": [prefix] * n,
            "etag": ["e"] * n,
            "width": pa.array([1] * n, pa.int32()),
            "height": pa.array([1] * n, pa.int32()),
            "image_jpeg": [b"jpeg"] * n,
        },
        schema=DOWNSCALED_IMAGES_SCHEMA,
    )


def rejected_rows(prefix: str, ids: list[str]) -> pa.Table:
    """`rejected_images` rows of one prefix for `ids` (uri `<prefix>/<id>.jpg`, reason "r"): the smallest rows a Lake test writes."""
    return pa.table(
        {
            "image_id": ids,
            "prefix": [prefix] * len(ids),
            "uri": [f"{prefix}/{i}.jpg" for i in ids],
            "reason": ["r"] * len(ids),
        },
        schema=REJECTED_IMAGES_SCHEMA,
    )


def store_sensor_result(instance: DagsterInstance, result: SensorResult) -> None:
    """What the daemon stores after a sensor tick: the partitions it adds and the events it reports."""
    for request in result.dynamic_partitions_requests or []:
        assert isinstance(request, AddDynamicPartitionsRequest)
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events or []:
        assert isinstance(event, AssetMaterialization)
        instance.report_runless_asset_event(event)


def user_shell_env(location: Mapping[str, str]) -> dict[str, str]:
    """What a user's shell passes to a command: this process's environment, its IMGEMB_* replaced by `location`."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IMGEMB_")} | dict(location)


def run_user_command(args: list[str], env: Mapping[str, str], cwd: Path = REPO_ROOT) -> str:
    """Runs a command as a user would, as its own process; its standard output. Fails the test if it fails."""
    done = subprocess.run(args, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# --- a real S3 API: moto's server in a subprocess on 127.0.0.1 -------------------

@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server subprocess, stopped at the end of the session."""
    with running_moto_server() as url:
        yield url


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard AWS variables pointing every client at the moto server."""
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    env = client_environment(moto_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def bucket(s3_env: dict[str, str]) -> str:
    """A new, empty bucket on the moto server."""
    name = f"imgemb-{uuid.uuid4().hex[:12]}"
    S3Settings().client().create_bucket(Bucket=name)
    return name


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, log: Path, poll_s: float = 1.0) -> None:
    """Polls `check` until it holds; on time-out fails with the tail of the server's log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}; log tail ({log.name}):\n{log.read_text()[-6000:]}")


def upload_tree(client: object, local_root: Path, bucket: str, key_prefix: str) -> None:
    for path in sorted(p for p in local_root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{key_prefix}/{path.relative_to(local_root).as_posix()}")


def dataset_on_s3(dataset: SampleDataset, bucket: str) -> SampleDataset:
    """Upload a generated dataset in the production layout; the same dataset, with s3:// roots."""
    client = S3Settings().client()
    upload_tree(client, Path(dataset.raw_images_uri), bucket, "raw-images")
    upload_tree(client, Path(dataset.sales_uri), bucket, "sales-data")
    return replace(dataset, raw_images_uri=f"s3://{bucket}/raw-images", sales_uri=f"s3://{bucket}/sales-data")
