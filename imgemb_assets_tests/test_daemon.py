"""The daemon (`dagster-daemon run`, what `dagster dev` starts beside the UI) on a local instance:

- `imgemb backfill-missing --submit` hands a fresh lake's work to the daemon as one asset backfill,
  which runs it in at most 1 + ceil(N / max_partitions_per_run) runs (sales first);
- once everything is up to date, the sensors and automation launch nothing;
- a prefix dropped into the raw-images root is embedded with no click, and so are photos dropped directly under
  the root (the article's flat layout: the default scheme's loose-object buckets).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset, generate_sample_dataset
from imgemb_assets.dagster_wiring.names import AUTOMATION_SENSOR_NAME
from imgemb_support.location import as_from_a_terminal, code_location_env, user_shell_env, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFIXES = ("2026-08-01", "2026-08-02", "2026-08-03")
MAX_PER_RUN = 2
SENSOR_INTERVAL_S = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> SampleDataset:
    return generate_sample_dataset(tmp_path_factory.mktemp("daemon"), images_per_prefix=4, prefixes=PREFIXES, seed=5)


def _run(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def daemon_env(dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh instance (the shipped dagster.yaml) and lake, with two of the three prefixes in the root."""
    shutil.copytree(dataset.raw_images_uri, tmp_path / "raw")
    shutil.move(tmp_path / "raw" / PREFIXES[-1], tmp_path / "later")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    location = code_location_env(
        replace(dataset, raw_images_uri=str(tmp_path / "raw")), tmp_path / "lake", dagster_home=home
    )
    location |= {"IMGEMB_MAX_PARTITIONS_PER_RUN": str(MAX_PER_RUN), "IMGEMB_SENSOR_INTERVAL_S": str(SENSOR_INTERVAL_S)}
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return user_shell_env(location)


@contextmanager
def running_daemon(env: dict[str, str], log: Path) -> Iterator[None]:
    with log.open("w") as out:
        process = subprocess.Popen(
            as_from_a_terminal([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"]),
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _embedded(instance: DagsterInstance) -> set[str]:
    return set(instance.get_materialized_partitions(AssetKey("image_embeddings")))


def _automation_ticks(instance: DagsterInstance) -> int:
    return sum(
        len(instance.get_ticks(state.instigator_origin_id, state.selector_id))
        for state in instance.all_instigator_state()
        if state.instigator_name == AUTOMATION_SENSOR_NAME
    )


# What automation runs after image_embeddings changes.
DOWNSTREAM_OF_EMBEDDINGS = {"image_search_index", "near_duplicates", "embedding_evaluation"}


@pytest.mark.slow
def test_a_submitted_backfill_then_nothing_then_a_dropped_prefix(daemon_env: dict[str, str], tmp_path: Path) -> None:
    imgemb = str(BIN / "imgemb")
    _run([imgemb, "discover"], daemon_env)
    submitted = _run([imgemb, "backfill-missing", "--asset", "image_embeddings", "--submit"], daemon_env)
    assert "submitted asset backfill" in submitted
    first_two = set(PREFIXES[:2])
    log = tmp_path / "daemon.log"
    with running_daemon(daemon_env, log), DagsterInstance.get() as instance:
        wait_for("the backfill", lambda: _embedded(instance) == first_two and not _unfinished(instance), 400, log)
        runs = instance.get_runs()
        assert all(run.is_success for run in runs), [(run.job_name, run.status) for run in runs]
        assert len(runs) <= 1 + math.ceil(len(first_two) / MAX_PER_RUN), [run.tags for run in runs]

        # What follows the embeddings (the search index, the evaluation) is requested by automation once the
        # backfill daemon, on its own 30 s loop, marks the backfill done: automation leaves assets alone while
        # a backfill that targets them is pending. So the two automation ticks are counted from the moment
        # nothing is pending or in flight (counted from the backfill's last run, both could pass while it was
        # still pending, and the downstream run then came during the up-to-date check below).
        wait_for("the backfill to be marked done", lambda: _settled(instance), 400, log)
        ticks_after_backfill = _automation_ticks(instance)
        wait_for(
            "the downstream work",
            lambda: _automation_ticks(instance) >= ticks_after_backfill + 2 and _settled(instance),
            400,
            log,
        )
        followers = instance.get_runs()[: len(instance.get_runs()) - len(runs)]  # newest first
        assert all(
            {key.to_user_string() for key in run.asset_selection or ()} <= DOWNSTREAM_OF_EMBEDDINGS for run in followers
        ), [(run.job_name, run.asset_selection) for run in followers]
        runs = instance.get_runs()

        # Up to date: ticks of the sensors and automation come and go, and nothing is launched.
        ticks_before = _automation_ticks(instance)
        wait_for("two automation ticks", lambda: _automation_ticks(instance) >= ticks_before + 2, 120, log)
        assert len(instance.get_runs()) == len(runs), "an up-to-date instance launched a run"

        # A new prefix in the root: registered, reported and embedded without a click.
        shutil.move(tmp_path / "later", tmp_path / "raw" / PREFIXES[-1])
        wait_for(
            "the dropped prefix", lambda: PREFIXES[-1] in _embedded(instance) and not _unfinished(instance), 400, log
        )
        assert all(run.is_success for run in instance.get_runs())

        # Photos dropped directly under the root, as in the article's flat bucket, with no setting changed:
        # the default scheme's loose-object buckets, registered and embedded without a click.
        loose = _drop_loose_photos(tmp_path / "raw", 2)
        buckets = {PartitionScheme().partition_of(name) for name in loose}
        wait_for("the loose photos", lambda: buckets <= _embedded(instance) and not _unfinished(instance), 400, log)
        assert all(run.is_success for run in instance.get_runs())
        lake = Lake(daemon_env["IMGEMB_LAKE_URI"])
        embedded = set(lake.read("image_embeddings", columns=["image_id"]).column("image_id").to_pylist())
        assert {name.removesuffix(".jpg") for name in loose} <= embedded


def _drop_loose_photos(root: Path, count: int) -> list[str]:
    """Copies of photos of the root's first folder, directly under the root, named after sales ids that have no image."""
    photos = sorted((root / PREFIXES[0]).glob("img_*.jpg"))[:count]
    names = [f"img_orphan_{number:04d}.jpg" for number in range(count)]
    for photo, name in zip(photos, names, strict=True):
        shutil.copy(photo, root / name)
    return names


def _settled(instance: DagsterInstance) -> bool:
    """No run queued or in flight, and no backfill waiting to launch one."""
    return not _unfinished(instance) and not _backfills_pending(instance)


def _backfills_pending(instance: DagsterInstance) -> bool:
    """A backfill automation requested that the backfill daemon has not finished launching."""
    return bool(instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])))


def _unfinished(instance: DagsterInstance) -> bool:
    return any(not run.is_finished for run in instance.get_runs())
