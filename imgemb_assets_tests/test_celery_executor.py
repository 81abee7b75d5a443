"""IMGEMB_EXECUTOR=celery for real: a Redis broker and result backend (Debian's redis-server), the
instance in a real PostgreSQL server, and two Celery worker processes started with `dagster-celery
worker start`: `cpu-worker` consuming the default `dagster` queue, `gpu-worker` consuming only `gpu`.
Two prefixes are materialized with `dagster asset materialize`, and the Delta tables, the run's
engine events (the worker dagster-celery names when it starts a step) and the `worker` metadata on
each embedding show that the embedding step ran on gpu-worker and every other step on cpu-worker.
Two runs that want the GPU at once take turns: the `gpu` pool (limit 1, the shipped dagster.yaml)
holds the second run's embedding step until the first one's ends, although the gpu worker could run
two. A gpu worker killed mid-step commits nothing, and the daemon's run monitor frees the slot the
killed step held.

No GPU is involved: "gpu-worker" is the worker that consumes the `gpu` queue, as a GPU machine's would.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus, EventLogEntry, RunsFilter
from dagster._core.storage.tags import PARTITION_NAME_TAG
from dagster._daemon.monitoring import execute_concurrency_slots_iteration
from deltalake import DeltaTable

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.names import GPU_POOL, S3_PREFIX_PARTITIONS_NAME
from imgemb_support.location import REPO_ROOT, code_location_env, user_shell_env
from imgemb_support.postgres_server import PG_URL_VARIABLE, with_postgres_storage

BIN = Path(sys.executable).parent
EMBEDDING_STEP = tables.IMAGE_EMBEDDINGS  # an asset's step key is its name


@dataclass(frozen=True)
class CeleryLocation:
    env: dict[str, str]  # the code location's environment: the run's and (plus a name) each worker's
    lake: Lake
    tmp: Path


SLOT_FREE_AFTER_S = 1  # the shipped config waits 300 s after a run ends before freeing its pool slots


def _write_instance(home: Path) -> None:
    """The shipped dagster.yaml (run queue, pools, run monitoring), with its storage in PostgreSQL: the
    run's process and both workers write to the same instance. Slots are freed sooner than shipped."""
    config = with_postgres_storage(REPO_ROOT / "dagster.yaml")
    config["run_monitoring"]["free_slots_after_run_end_seconds"] = SLOT_FREE_AFTER_S
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def celery_location(
    small_dataset: SampleDataset,
    postgres_url: str,
    redis_url: str,
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

    def __init__(self, location: CeleryLocation, name: str, queue: str, concurrency: int) -> None:
        self.name = name
        self.log = location.tmp / f"{name}.log"
        config = location.tmp / "celery.yaml"
        # The executor's config block, which `dagster-celery worker start -y` reads for the broker URLs.
        config.write_text(
            yaml.safe_dump(
                {
                    "execution": {
                        "config": {
                            "broker": location.env["IMGEMB_CELERY_BROKER_URL"],
                            "backend": location.env["IMGEMB_CELERY_BACKEND_URL"],
                        }
                    }
                }
            )
        )
        command = [
            str(BIN / "dagster-celery"),
            "worker",
            "start",
            "-A",
            "dagster_celery.app",
            "-y",
            str(config),
            "-q",
            queue,
            "-n",
            name,
            "--",
            f"--concurrency={concurrency}",
        ]
        self.process = subprocess.Popen(
            command,
            cwd=location.tmp,
            env=location.env | {"IMGEMB_WORKER_NAME": name},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if f"{self.name}@" in (text := self.log.read_text()) and " ready." in text:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(
            f"celery worker {self.name} not ready (exit {self.process.poll()}):\n{self.log.read_text()[-4000:]}"
        )

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


def _cpu_worker(location: CeleryLocation) -> Worker:
    return Worker(location, "cpu-worker", "dagster", concurrency=1)  # two CPU cores here


def _gpu_worker(location: CeleryLocation) -> Worker:
    # Room for two steps at once, as on a machine with two GPUs: only the `gpu` pool keeps embedding
    # steps of different runs apart.
    return Worker(location, "gpu-worker", "gpu", concurrency=2)


@pytest.fixture
def workers(celery_location: CeleryLocation) -> Iterator[dict[str, Worker]]:
    started = {"cpu": _cpu_worker(celery_location), "gpu": _gpu_worker(celery_location)}
    try:
        for worker in started.values():
            worker.wait_ready()
        yield started
    finally:
        for worker in started.values():
            worker.stop()


def _materialize_command(prefix: str, selection: str) -> list[str]:
    return [
        str(BIN / "dagster"),
        "asset",
        "materialize",
        "-m",
        "imgemb_assets.definitions",
        "--select",
        selection,
        "--partition",
        prefix,
    ]


def _materialize(location: CeleryLocation, prefix: str, selection: str = "*", timeout_s: float = 600) -> None:
    done = subprocess.run(
        _materialize_command(prefix, selection),
        cwd=location.tmp,
        env=location.env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
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


def _run_of(instance: DagsterInstance, prefix: str) -> DagsterRun | None:
    runs = instance.get_runs(RunsFilter(tags={PARTITION_NAME_TAG: prefix}), limit=1)
    return runs[0] if runs else None


def _step_events(instance: DagsterInstance, run_id: str, event_type: DagsterEventType) -> list[EventLogEntry]:
    records = instance.get_records_for_run(run_id, of_type=event_type).records
    return [r.event_log_entry for r in records if r.event_log_entry.dagster_event.step_key == EMBEDDING_STEP]


def _wait_for(
    condition: Callable[[], bool], what: str, run: subprocess.Popen, log: Path, timeout_s: float = 300
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert run.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _start_embedding_run(location: CeleryLocation, prefix: str) -> tuple[subprocess.Popen, Path]:
    log = location.tmp / f"embed-{prefix}.log"
    run = subprocess.Popen(
        _materialize_command(prefix, EMBEDDING_STEP),
        cwd=location.tmp,
        env=location.env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return run, log


@pytest.mark.slow
def test_the_gpu_pool_lets_one_embedding_step_run_at_a_time_across_runs(
    small_dataset: SampleDataset, celery_location: CeleryLocation, workers: dict[str, Worker]
) -> None:
    first, second = small_dataset.prefixes
    upstream = ",".join(name for name in tables.ALL_TABLES if name != tables.IMAGE_EMBEDDINGS)
    for prefix in (first, second):
        _materialize(celery_location, prefix, upstream)

    with DagsterInstance.get() as instance:
        first_run, first_log = _start_embedding_run(celery_location, first)
        _wait_for(
            lambda: (
                (run := _run_of(instance, first)) is not None
                and bool(_step_events(instance, run.run_id, DagsterEventType.STEP_START))
            ),
            "the first embedding step to start",
            first_run,
            first_log,
        )
        first_run_id = _run_of(instance, first).run_id
        (started,) = _step_events(instance, first_run_id, DagsterEventType.STEP_START)
        # Hold the first step inside the gpu worker (its pool process is paused) so that the second run
        # certainly asks for the GPU while the first one has it: nothing is left to timing.
        os.kill(started.dagster_event.pid, signal.SIGSTOP)
        try:
            second_run, second_log = _start_embedding_run(celery_location, second)

            def second_step_blocked() -> bool:
                # dagster-celery's loop logs no "blocked by pool" event (it skips the executor's
                # concurrency messages): the wait shows in the pool's own table, as on the UI's pool page.
                run = _run_of(instance, second)
                return run is not None and (run.run_id, EMBEDDING_STEP) in _waiting_gpu_steps(instance)

            _wait_for(second_step_blocked, "the second run to wait for the gpu pool", second_run, second_log)
            second_run_id = _run_of(instance, second).run_id
            time.sleep(2)  # the gpu worker has a free process: only the pool keeps the second step out
            assert _step_events(instance, second_run_id, DagsterEventType.STEP_START) == []
            assert _claimed_gpu_slots(instance) == [(first_run_id, EMBEDDING_STEP)]
        finally:
            os.kill(started.dagster_event.pid, signal.SIGCONT)

        for run, log in ((first_run, first_log), (second_run, second_log)):
            assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
        (first_done,) = _step_events(instance, first_run_id, DagsterEventType.STEP_SUCCESS)
        (second_started,) = _step_events(instance, second_run_id, DagsterEventType.STEP_START)
        assert second_started.timestamp >= first_done.timestamp
        for run_id in (first_run_id, second_run_id):
            placed = _celery_worker_of_each_step(instance, run_id)
            assert placed[EMBEDDING_STEP].startswith("gpu-worker@"), placed

    for prefix in (first, second):
        embedded = celery_location.lake.read(tables.IMAGE_EMBEDDINGS, prefix)
        assert embedded.num_rows == small_dataset.expected_joined(prefix), prefix


def _claimed_gpu_slots(instance: DagsterInstance) -> list[tuple[str, str | None]]:
    return [
        (slot.run_id, slot.step_key) for slot in instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots
    ]


def _waiting_gpu_steps(instance: DagsterInstance) -> list[tuple[str, str]]:
    """Steps queued for a `gpu` slot that none has been assigned yet."""
    pending = instance.event_log_storage.get_concurrency_info(GPU_POOL).pending_steps
    return [(step.run_id, step.step_key) for step in pending if step.assigned_timestamp is None]


def _run_monitor_once(instance: DagsterInstance) -> None:
    """One pass of the daemon's slot monitor (what `dagster-daemon run` does every poll interval). The
    daemon itself is not started: its sensors and automation would launch runs of their own here."""
    process_context = SimpleNamespace(instance=instance)  # the only part of the workspace it reads
    for error in execute_concurrency_slots_iteration(process_context, logging.getLogger("run-monitor")):
        assert error is None, error


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
        _materialize_command(killed_prefix, EMBEDDING_STEP),
        cwd=celery_location.tmp,
        env=celery_location.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    with DagsterInstance.get() as instance:
        deadline = time.monotonic() + 300
        while not _embedding_step_started(instance):
            assert run.poll() is None and time.monotonic() < deadline, (
                celery_location.tmp / "killed-run.log"
            ).read_text()[-3000:]
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
    assert set(celery_location.lake.read(tables.IMAGE_EMBEDDINGS).column("prefix").unique().to_pylist()) == {
        done_prefix
    }

    # The killed step never released its `gpu` pool slot (pool limit 1): a rerun would wait for it forever
    # but for the daemon's run monitor, which frees the slots of a run that ended long enough ago.
    with DagsterInstance.get() as instance:
        killed_run = instance.get_runs(limit=1)[0]
        assert killed_run.is_finished, killed_run.status  # the monitor frees only the slots of ended runs
        assert _claimed_gpu_slots(instance) == [(killed_run.run_id, EMBEDDING_STEP)]
        time.sleep(SLOT_FREE_AFTER_S + 1)
        _run_monitor_once(instance)
        assert _claimed_gpu_slots(instance) == []

    workers["gpu"] = _gpu_worker(celery_location)  # the fixture stops the restarted one
    workers["gpu"].wait_ready()
    _materialize(celery_location, killed_prefix, EMBEDDING_STEP, timeout_s=300)
    embedded = celery_location.lake.read(tables.IMAGE_EMBEDDINGS, killed_prefix)
    assert embedded.num_rows == small_dataset.expected_joined(killed_prefix)
    assert DeltaTable(embeddings_uri).version() == version_before + 1
