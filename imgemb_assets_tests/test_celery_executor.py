"""IMGEMB_EXECUTOR=celery for real: a Redis broker and result backend (Debian's redis-server), the
instance in a real PostgreSQL server, and two Celery worker processes started with `dagster-celery
worker start`: `cpu-worker` consuming the default `dagster` queue, `gpu-worker` consuming only `gpu`.
Two prefixes are materialized with `dagster asset materialize`, and the Delta tables, the run's
engine events (the worker dagster-celery names when it starts a step) and the `worker` metadata on
each embedding show that the embedding step ran on gpu-worker and every other step on cpu-worker.

No GPU is involved: "gpu-worker" is the worker that consumes the `gpu` queue, as a GPU machine's would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus

from imgemb_assets.core import tables
from imgemb_assets.core.lake import Lake
from imgemb_assets.core.sample_data import SampleDataset
from imgemb_assets.defs.partitions import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.defs.placement import GPU_POOL
from imgemb_assets_tests.conftest import code_location_env, user_shell_env

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_URL_VARIABLE = "DAGSTER_PG_URL"
EMBEDDING_STEP = tables.IMAGE_EMBEDDINGS  # an asset's step key is its name


@dataclass(frozen=True)
class CeleryLocation:
    env: dict[str, str]  # the code location's environment: the run's and (plus a name) each worker's
    lake: Lake
    tmp: Path


def _write_instance(home: Path) -> None:
    """The shipped dagster.yaml (run queue, pools), with its storage in PostgreSQL: the run's process and
    both workers write to the same instance."""
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config["storage"] = {"postgres": {"postgres_url": {"env": PG_URL_VARIABLE}}}
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def celery_location(
    small_dataset: SampleDataset,
    postgres_url: str,
    redis_url: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> CeleryLocation:
    home = tmp_path / "dagster_home"
    _write_instance(home)
    env = user_shell_env({})
    env |= code_location_env(small_dataset, tmp_path / "lake", dagster_home=home)
    env |= {
        PG_URL_VARIABLE: postgres_url,
        "IMGEMB_EXECUTOR": "celery",
        "IMGEMB_CELERY_BROKER_URL": f"{redis_url}/0",
        "IMGEMB_CELERY_BACKEND_URL": f"{redis_url}/1",
        # `dagster-celery worker start` runs `celery` from PATH: this venv's.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key in ("DAGSTER_HOME", PG_URL_VARIABLE):
        monkeypatch.setenv(key, env[key])
    # No dagster CLI command adds dynamic partitions: register them the way the sensor does.
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, small_dataset.prefixes)
    return CeleryLocation(env=env, lake=Lake(str(tmp_path / "lake")), tmp=tmp_path)


class Worker:
    """One `dagster-celery worker start` process tree, in its own process group so that it can be
    stopped (or killed) whole: the CLI, the celery main process and its pool child."""

    def __init__(self, location: CeleryLocation, name: str, queue: str) -> None:
        self.name = name
        self.log = location.tmp / f"{name}.log"
        config = location.tmp / "celery.yaml"
        # The executor's config block, which `dagster-celery worker start -y` reads for the broker URLs.
        config.write_text(yaml.safe_dump({"execution": {"config": {
            "broker": location.env["IMGEMB_CELERY_BROKER_URL"], "backend": location.env["IMGEMB_CELERY_BACKEND_URL"],
        }}}))
        command = [
            str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y", str(config),
            "-q", queue, "-n", name,
            # One step at a time per worker: two CPU cores here, and it keeps the kill test to one step.
            "--", "--concurrency=1",
        ]
        self.process = subprocess.Popen(
            command, cwd=location.tmp, env=location.env | {"IMGEMB_WORKER_NAME": name},
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if f"{self.name}@" in (text := self.log.read_text()) and " ready." in text:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"celery worker {self.name} not ready (exit {self.process.poll()}):\n{self.log.read_text()[-4000:]}")

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # the group this worker's session leads
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def workers(celery_location: CeleryLocation) -> Iterator[dict[str, Worker]]:
    started = {
        "cpu": Worker(celery_location, "cpu-worker", "dagster"),
        "gpu": Worker(celery_location, "gpu-worker", "gpu"),
    }
    try:
        for worker in started.values():
            worker.wait_ready()
        yield started
    finally:
        for worker in started.values():
            worker.stop()


def _materialize_command(prefix: str, selection: str) -> list[str]:
    return [str(BIN / "dagster"), "asset", "materialize", "-m", "imgemb_assets.definitions", "--select", selection,
            "--partition", prefix]


def _materialize(location: CeleryLocation, prefix: str, selection: str = "*", timeout_s: float = 600) -> None:
    done = subprocess.run(
        _materialize_command(prefix, selection), cwd=location.tmp, env=location.env,
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _celery_worker_of_each_step(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """step key -> the worker that dagster-celery's task reported as running it ("Celery worker")."""
    placed: dict[str, str] = {}
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT).records:
        event = record.event_log_entry.dagster_event
        if event is None or event.step_key is None:
            continue
        worker = event.engine_event_data.metadata.get("Celery worker")
        if worker is not None:
            placed[event.step_key] = str(worker.value)
    return placed


@pytest.mark.slow
def test_embedding_steps_run_on_the_gpu_worker_and_every_other_step_on_the_cpu_worker(
    small_dataset: SampleDataset, celery_location: CeleryLocation, workers: dict[str, Worker]
) -> None:
    for prefix in small_dataset.prefixes:
        _materialize(celery_location, prefix)

    for prefix in small_dataset.prefixes:
        embedded = celery_location.lake.read(tables.IMAGE_EMBEDDINGS, prefix)
        assert embedded.num_rows == small_dataset.expected_joined(prefix), prefix

    with DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == len(small_dataset.prefixes)
        for run in runs:
            assert run.status == DagsterRunStatus.SUCCESS
            started = {
                r.event_log_entry.dagster_event.step_key
                for r in instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_START).records
            }
            placed = _celery_worker_of_each_step(instance, run.run_id)
            assert set(placed) == started and EMBEDDING_STEP in started, (placed, started)
            for step, worker in placed.items():
                expected = "gpu-worker@" if step == EMBEDDING_STEP else "cpu-worker@"
                assert worker.startswith(expected), (run.run_id, step, worker)

        # The materializations themselves say where they ran: the gpu worker's pool process.
        records = instance.fetch_materializations(AssetKey(tables.IMAGE_EMBEDDINGS), limit=100).records
        assert sorted(r.partition_key for r in records) == sorted(small_dataset.prefixes)
        for record in records:
            worker = record.asset_materialization.metadata["worker"].value
            assert str(worker).startswith("gpu-worker@"), (record.partition_key, worker)


def _embedding_step_started(instance: DagsterInstance) -> bool:
    """Whether the gpu worker has begun the embedding step of the newest run (its STEP_START is in)."""
    runs = instance.get_runs(limit=1)
    if not runs:
        return False
    records = instance.get_records_for_run(runs[0].run_id, of_type=DagsterEventType.STEP_START).records
    return any(r.event_log_entry.dagster_event.step_key == EMBEDDING_STEP for r in records)


@pytest.mark.slow
def test_killing_the_gpu_worker_mid_step_keeps_the_table_and_a_rerun_completes(
    small_dataset: SampleDataset, celery_location: CeleryLocation, workers: dict[str, Worker]
) -> None:
    done_prefix, killed_prefix = small_dataset.prefixes
    _materialize(celery_location, done_prefix)
    # The killed prefix's inputs are ready, so its run holds the embedding step only.
    upstream = [name for name in tables.ALL_TABLES if name != tables.IMAGE_EMBEDDINGS]
    _materialize(celery_location, killed_prefix, ",".join(upstream))
    embeddings_uri = celery_location.lake.table_uri(tables.IMAGE_EMBEDDINGS)
    version_before = DeltaTable(embeddings_uri).version()

    log = (celery_location.tmp / "killed-run.log").open("w")
    run = subprocess.Popen(
        _materialize_command(killed_prefix, EMBEDDING_STEP), cwd=celery_location.tmp, env=celery_location.env,
        stdout=log, stderr=subprocess.STDOUT,
    )
    with DagsterInstance.get() as instance:
        deadline = time.monotonic() + 300
        while not _embedding_step_started(instance):
            assert run.poll() is None and time.monotonic() < deadline, (celery_location.tmp / "killed-run.log").read_text()[-3000:]
            time.sleep(0.1)
    workers["gpu"].signal_group(signal.SIGKILL)  # the worker, its pool process and the step in it, at once
    workers["gpu"].process.wait(timeout=30)
    # The step's task died with the worker: the run's executor waits for a result that never comes,
    # so it is stopped, as an operator would cancel it.
    run.send_signal(signal.SIGINT)
    try:
        run.wait(timeout=60)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()

    assert DeltaTable(embeddings_uri).version() == version_before, "the killed step committed"
    assert set(celery_location.lake.read(tables.IMAGE_EMBEDDINGS).column("prefix").unique().to_pylist()) == {done_prefix}

    # The killed step never released its `gpu` pool slot (pool limit 1), so a rerun would wait for it
    # forever. A deployment's daemon frees it (run_monitoring.free_slots_after_run_end_seconds); no
    # daemon runs here, so the test frees it as that monitor does, after checking it is the killed run's.
    with DagsterInstance.get() as instance:
        killed_run_id = instance.get_runs(limit=1)[0].run_id
        claimed = instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots
        assert [(slot.run_id, slot.step_key) for slot in claimed] == [(killed_run_id, EMBEDDING_STEP)]
        instance.event_log_storage.free_concurrency_slots_for_run(killed_run_id)

    workers["gpu"] = Worker(celery_location, "gpu-worker", "gpu")  # the fixture stops the restarted one
    workers["gpu"].wait_ready()
    _materialize(celery_location, killed_prefix, EMBEDDING_STEP, timeout_s=300)
    embedded = celery_location.lake.read(tables.IMAGE_EMBEDDINGS, killed_prefix)
    assert embedded.num_rows == small_dataset.expected_joined(killed_prefix)
    assert DeltaTable(embeddings_uri).version() == version_before + 1
