"""Shared fixtures: a small generated sample dataset, the environment that points the code location at it,
and a moto S3 server subprocess with the AWS variables that reach it."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest
from dagster import DagsterInstance

from imgemb_assets.core.sample.dataset import SampleDataset, generate_sample_dataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.location import code_location_instance
from imgemb_support.moto_server import client_environment, running_moto_server

# The real PostgreSQL and Redis server fixtures (postgres_server, postgres_url, redis_url), for any test module.
pytest_plugins = ["imgemb_support.postgres_server", "imgemb_support.redis_server"]

SMALL_PREFIXES = ("2026-11-01", "2026-11-02")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    """Two prefixes of eight images each, with the sample's broken files spread over them."""
    return generate_sample_dataset(
        tmp_path_factory.mktemp("sample"), images_per_prefix=8, prefixes=SMALL_PREFIXES, seed=1
    )


@pytest.fixture
def own_sales_dataset(small_dataset: SampleDataset, tmp_path: Path) -> SampleDataset:
    """The small dataset with a copy of its sales export that the test may change."""
    shutil.copytree(small_dataset.sales_uri, tmp_path / "sales")
    return replace(small_dataset, sales_uri=str(tmp_path / "sales"))


@pytest.fixture
def location_instance_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[SampleDataset], DagsterInstance]]:
    """Opens a test instance with a dataset's prefixes registered, the location's variables pointing at the
    dataset and a lake in tmp_path (`code_location_instance`); closed at the end of the test."""
    with ExitStack() as stack:
        yield lambda dataset: stack.enter_context(code_location_instance(dataset, tmp_path / "lake", monkeypatch))


@pytest.fixture
def own_sales_instance(
    own_sales_dataset: SampleDataset, location_instance_for: Callable[[SampleDataset], DagsterInstance]
) -> DagsterInstance:
    return location_instance_for(own_sales_dataset)


@pytest.fixture
def own_dataset(small_dataset: SampleDataset, tmp_path: Path) -> SampleDataset:
    """The small dataset with private copies of its raw images and sales export, free to change."""
    shutil.copytree(small_dataset.raw_images_uri, tmp_path / "raw")
    shutil.copytree(small_dataset.sales_uri, tmp_path / "sales")
    return replace(small_dataset, raw_images_uri=str(tmp_path / "raw"), sales_uri=str(tmp_path / "sales"))


@pytest.fixture
def own_instance(
    own_dataset: SampleDataset, location_instance_for: Callable[[SampleDataset], DagsterInstance]
) -> DagsterInstance:
    """An instance with `own_dataset`'s prefixes registered and its `sales` table materialized (lake in tmp_path)."""
    from imgemb_assets.dagster_wiring.location.settings import LocationSettings
    from imgemb_assets.dagster_wiring.names import SALES_JOB_NAME
    from imgemb_assets.definitions import build_definitions

    instance = location_instance_for(own_dataset)
    sales_job = build_definitions(LocationSettings()).resolve_job_def(SALES_JOB_NAME)
    assert sales_job.execute_in_process(instance=instance).success
    return instance


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
