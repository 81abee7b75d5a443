"""The code location run as a user runs it: its variables, an instance with the prefixes registered, commands
as processes, what the daemon stores after a sensor tick, and a dataset uploaded to S3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from dagster import AddDynamicPartitionsRequest, AssetMaterialization, DagsterInstance, SensorResult, instance_for_test

from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.location.partitions import register_prefixes

REPO_ROOT = Path(__file__).resolve().parents[1]


# A program started in the background of a non-interactive shell (`cmd &`, nohup, a CI runner's script) inherits
# SIGINT ignored, and Python keeps an inherited ignore. `dagster dev` handles SIGTERM with its SIGINT handler, so it
# then ignores SIGTERM too and never stops (seen as test_dagster_dev's teardown failing in full runs only).
_WITH_SIGINT_AT_ITS_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"
)


def as_from_a_terminal(command: list[str]) -> list[str]:
    """`command` started as a terminal starts it, with SIGINT at its default action whatever the tests inherited."""
    return [sys.executable, "-c", _WITH_SIGINT_AT_ITS_DEFAULT, *command]


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
        register_prefixes(instance, dataset.prefixes)
        yield instance


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


def run_user_process(
    args: list[str], env: Mapping[str, str], cwd: Path = REPO_ROOT, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    """Runs a command as a user would, as its own process; what it wrote. Fails the test if it fails."""
    done = subprocess.run(args, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run_user_command(args: list[str], env: Mapping[str, str], cwd: Path = REPO_ROOT) -> str:
    """Runs a command as a user would, as its own process; its standard output. Fails the test if it fails."""
    return run_user_process(args, env, cwd).stdout


def run_readme_backfill(env: Mapping[str, str], prefixes: Sequence[str]) -> str:
    """The README's `imgemb backfill-missing --asset image_embeddings` on an instance that has none of `prefixes`
    registered and no daemon: it registers every one and materializes in its own process. Its output."""
    imgemb = str(Path(sys.executable).with_name("imgemb"))
    out = run_user_command([imgemb, "backfill-missing", "--asset", "image_embeddings"], env)
    assert f"registered {len(prefixes)} new" in out
    assert "no daemon is running: materializing here" in out
    return out


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
