"""A prefix removed (IMGEMB_VANISHED_PREFIXES=remove) while a run writes it never comes back.

The race is forced, not hoped for: the writing run (the manifest step, or the evaluation step) is held
in its lake commit on another thread, the prefix's folder is deleted and `remove_vanished_prefixes`
runs; the writer is let go only once the removal has finished or says it waits for that run. Held
before its precondition is checked, the write must refuse to commit (the partition is no longer
registered); held after the check passed (its commit already on its way), the removal must delete its
rows after it. Either way no row of the removed prefix is left in any table.

Real Delta tables, a real instance, runs executed in process on two threads; the one thing injected
is the hold at the lake's commit (`commits.commit_with_retries`), where the race is.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult, RunsFilter, instance_for_test

from imgemb_assets.core.lake import commits, tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.ingest.vanished_prefixes import PARTITIONED_TABLES, removal_request
from imgemb_assets.dagster_wiring.location.partitions import register_prefixes
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import (
    PREFIX_JOB_NAME,
    REMOVE_VANISHED_JOB_NAME,
    S3_PREFIX_PARTITIONS_NAME,
    SALES_JOB_NAME,
)
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_env

SMALL_MODEL = {"weights": "random", "model": "resnet18", "device": "cpu", "batch_size": 8}
RUN_CONFIG = {"resources": {"embedding_model": {"config": SMALL_MODEL}}}
WAIT_S = 120.0

defs = build_definitions(LocationSettings())


@dataclass
class CommitHold:
    """Holds the first commit of one partition of one table until released: the in-flight run's write.

    `after_check`: held once the write's precondition has passed (the commit is on its way), else before it.
    """

    table: str
    prefix: str
    after_check: bool
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    used: bool = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = commits.commit_with_retries

        def held(commit: Callable[[], None], what: str, precondition: Callable[[], None] | None = None) -> None:
            if self.used or what != f"partition {self.prefix!r} of {self.table}":
                return original(commit, what, precondition)
            self.used = True  # the removal's delete of the same partition goes through
            if not self.after_check:
                self._hold()
                return original(commit, what, precondition)
            return original(commit, what, self._checked_then_held(precondition))

        monkeypatch.setattr(commits, "commit_with_retries", held)

    def _checked_then_held(self, precondition: Callable[[], None] | None) -> Callable[[], None]:
        first = True

        def check() -> None:
            nonlocal first
            if precondition is not None:
                precondition()
            if first:
                first = False
                self._hold()

        return check

    def _hold(self) -> None:
        self.reached.set()
        assert self.release.wait(WAIT_S), "the test never released the held commit"


class InThread(threading.Thread):
    """A run executed in process on its own thread; its result (or error) kept."""

    def __init__(self, execute: Callable[[], ExecuteInProcessResult]) -> None:
        super().__init__(daemon=True)
        self._execute = execute
        self.result: ExecuteInProcessResult | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._execute()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def outcome(self) -> ExecuteInProcessResult:
        self.join(WAIT_S)
        assert not self.is_alive(), "the run did not end"
        assert self.error is None and self.result is not None, self.error
        return self.result


@pytest.fixture
def own_instance(
    own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterInstance]:
    """conftest's own_instance, without capturing compute logs.

    These tests run two in-process executions at once, in threads. Dagster's local compute-log
    capture redirects the process's stdout and stderr through a `tail` subprocess per step: two at
    once in one process deadlocked a run's thread on that subprocess (seen in CI). Nothing here
    reads the captured logs.
    """
    for key, value in code_location_env(own_dataset, tmp_path / "lake").items():
        monkeypatch.setenv(key, value)
    no_capture = {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
    with instance_for_test(overrides={"compute_logs": no_capture}) as instance:
        register_prefixes(instance, own_dataset.prefixes)
        sales_job = build_definitions(LocationSettings()).resolve_job_def(SALES_JOB_NAME)
        assert sales_job.execute_in_process(instance=instance).success
        yield instance


def _wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _removal_waits_or_ended(instance: DagsterInstance, remover: InThread) -> bool:
    """The removal has ended, or has said it waits for the runs writing the prefix (it then holds its delete)."""
    if not remover.is_alive():
        return True
    for record in instance.get_run_records(RunsFilter(job_name=REMOVE_VANISHED_JOB_NAME)):
        for entry in instance.all_logs(record.dagster_run.run_id):
            if not entry.is_dagster_event and "waiting for runs" in entry.user_message:
                return True
    return False


def _rows_left(lake: Lake, prefix: str) -> dict[str, int]:
    return {name: lake.read(name, prefix).num_rows for name in PARTITIONED_TABLES if lake.exists(name)}


def _step_failures(result: ExecuteInProcessResult) -> list[str]:
    """The description of each step's Failure."""
    failures = [event.step_failure_data.user_failure_data for event in result.get_step_failure_events()]
    return [str(failure.description) for failure in failures if failure is not None]


def _write_during_removal(
    instance: DagsterInstance,
    dataset: SampleDataset,
    hold: CommitHold,
    monkeypatch: pytest.MonkeyPatch,
    removal_config: dict[str, Any] | None = None,
    release_once_removal_ended: bool = False,
) -> tuple[ExecuteInProcessResult, ExecuteInProcessResult]:
    """Runs `hold.table` for `hold.prefix`, held at its commit while the prefix is deleted and removed; both results.

    The writer is let go once the removal has ended or says it waits for it (or, with
    `release_once_removal_ended`, only once it has ended: its wait ran out).
    """
    hold.install(monkeypatch)
    writer = InThread(
        lambda: defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance,
            partition_key=hold.prefix,
            asset_selection=[AssetKey(hold.table)],
            run_config=RUN_CONFIG,
            raise_on_error=False,
        )
    )
    writer.start()
    _wait_until("the writer reaches its commit", hold.reached.is_set)
    shutil.rmtree(Path(dataset.raw_images_uri) / hold.prefix)  # the prefix vanishes from the root
    run_config = removal_config or removal_request([hold.prefix]).run_config
    remover = InThread(
        lambda: defs.resolve_job_def(REMOVE_VANISHED_JOB_NAME).execute_in_process(
            instance=instance, run_config=run_config, raise_on_error=False
        )
    )
    remover.start()
    if release_once_removal_ended:
        _wait_until("the removal ends", lambda: not remover.is_alive())
    else:
        _wait_until("the removal ends or waits for the writer", lambda: _removal_waits_or_ended(instance, remover))
    hold.release.set()
    return writer.outcome(), remover.outcome()


@pytest.mark.parametrize("after_check", [False, True], ids=["held-before-its-check", "held-after-its-check"])
@pytest.mark.parametrize("table", [tables.RAW_IMAGE_MANIFEST, tables.EMBEDDING_EVALUATION])
def test_a_write_in_flight_during_a_removal_leaves_no_row_of_the_removed_prefix(
    table: str,
    after_check: bool,
    own_dataset: SampleDataset,
    own_instance: DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gone, kept = own_dataset.prefixes
    lake = Lake(str(tmp_path / "lake"))
    if table == tables.EMBEDDING_EVALUATION:  # the evaluation reads the prefix's vectors: its chain first
        chain = defs.resolve_job_def(PREFIX_JOB_NAME)
        assert chain.execute_in_process(instance=own_instance, partition_key=gone, run_config=RUN_CONFIG).success

    hold = CommitHold(table, gone, after_check)
    writer, remover = _write_during_removal(own_instance, own_dataset, hold, monkeypatch)

    assert _rows_left(lake, gone) == {name: 0 for name in _rows_left(lake, gone)}
    assert remover.success
    assert own_instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME) == [kept]
    assert not writer.success
    (failure,) = _step_failures(writer)
    if after_check:  # its commit landed, before the removal's delete took it
        assert f"prefix {gone!r} was removed (remove_vanished_prefixes) while this run wrote it" in failure
    else:  # refused at its commit
        assert f"prefix {gone!r} is no longer a registered partition" in failure and "nothing was written" in failure


def test_a_run_still_writing_after_the_wait_keeps_the_prefix_unregistered_and_a_rerun_removes_its_rows(
    own_dataset: SampleDataset, own_instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone, kept = own_dataset.prefixes
    lake = Lake(str(tmp_path / "lake"))
    config = removal_request([gone]).run_config
    prefixes = config["ops"]["remove_prefixes"]["config"]["prefixes"]
    short_wait = {"ops": {"remove_prefixes": {"config": {"prefixes": prefixes, "wait_for_runs_s": 0.5}}}}

    hold = CommitHold(tables.RAW_IMAGE_MANIFEST, gone, after_check=True)
    writer, remover = _write_during_removal(
        own_instance, own_dataset, hold, monkeypatch, short_wait, release_once_removal_ended=True
    )

    assert not remover.success
    (failure,) = _step_failures(remover)
    assert f"{gone!r} by run {writer.run_id}" in failure and "again with the same prefixes" in failure
    assert lake.read(tables.RAW_IMAGE_MANIFEST, gone).num_rows > 0  # the writer committed past its check
    assert own_instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME) == [kept]  # nothing requests it again

    rerun = defs.resolve_job_def(REMOVE_VANISHED_JOB_NAME).execute_in_process(instance=own_instance, run_config=config)
    assert rerun.success
    assert _rows_left(lake, gone) == {tables.RAW_IMAGE_MANIFEST: 0}
