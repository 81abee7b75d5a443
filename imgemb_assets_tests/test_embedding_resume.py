"""Big partitions are visible and resumable: the embedding step's progress lines reach the run's event log
(what the UI shows), and a step that dies mid-partition resumes from its staged vectors on the rerun.

- in process: progress lines (with a short interval) in `instance.all_logs(run_id)`, the totals in the
  materialization's metadata, the staging folder gone after the commit; a commit that fails leaves the
  staged vectors, and the rerun embeds nothing again.
- as a user runs it: `dagster asset materialize` of a 2,000-photo partition (resnet18, random weights,
  batches of 16) killed with SIGKILL once about 80% of it is staged, then run again: the rerun sends at
  most one batch more than the unstaged images through the model, and the table holds each photo once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance
from deltalake import DeltaTable

from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.models import model_id_for
from imgemb_assets.core.embedding.staging import PartitionStaging, staging_root_uri
from imgemb_assets.core.imaging.synthetic import synthetic_photo
from imgemb_assets.core.lake import commits, tables
from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset, write_sales_export
from imgemb_assets.dagster_wiring.embedding import step as embedding_step
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.definitions import build_definitions
from imgemb_support.location import code_location_env, user_shell_env

BATCH_SIZE = 4
SMALL_MODEL = {"weights": "random", "model": "resnet18", "device": "cpu", "batch_size": BATCH_SIZE}
RUN_CONFIG = {"resources": {"embedding_model": {"config": SMALL_MODEL}}}
PROGRESS_LINE = re.compile(r": embedding: (\d+)/(\d+) \(\d+\.\d%\), \d+\.\d images/s, ETA (\d+:\d\d:\d\d|\?)$")

defs = build_definitions(LocationSettings())


def _run_prefix(instance: DagsterInstance, prefix: str) -> tuple[bool, str]:
    result = defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
        instance=instance, partition_key=prefix, run_config=RUN_CONFIG, raise_on_error=False
    )
    return result.success, result.run_id


def _embedding_metadata(instance: DagsterInstance) -> dict:
    event = instance.get_latest_materialization_event(AssetKey(tables.IMAGE_EMBEDDINGS))
    assert event is not None and event.asset_materialization is not None
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def _messages(instance: DagsterInstance, run_id: str) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(run_id) if not entry.is_dagster_event]


def test_progress_lines_reach_the_runs_event_log_and_the_totals_its_metadata(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding_step, "EMBEDDING_PROGRESS_INTERVAL_S", 0.0)  # a line at every advance
    prefix = own_dataset.prefixes[0]
    total = own_dataset.expected_joined(prefix)
    success, run_id = _run_prefix(own_instance, prefix)
    assert success

    lines = [line for line in _messages(own_instance, run_id) if line.startswith(f"{prefix}: embedding")]
    counts = [(int(m.group(1)), int(m.group(2))) for line in lines if (m := PROGRESS_LINE.search(line))]
    assert len(counts) >= total // BATCH_SIZE, lines  # one line per model batch at least
    assert all(of == total for _, of in counts) and counts[-1][0] == total
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)
    assert any(re.search(rf"embedding: done, {total}/{total} in \d+\.\d s", line) for line in lines), lines

    metadata = _embedding_metadata(own_instance)
    assert metadata["progress_total"] == metadata["progress_done"] == total
    assert metadata["progress_seconds"] > 0 and metadata["progress_images_per_second"] > 0
    assert metadata["images_embedded"] == metadata["images_staged"] == total
    assert metadata["images_resumed"] == 0
    assert not Path(staging_root_uri(Lake(str(tmp_path / "lake")))).exists()  # staged until the commit, then gone


def test_a_failed_commit_keeps_the_staged_vectors_and_the_rerun_embeds_nothing_again(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = own_dataset.prefixes[0]
    total = own_dataset.expected_joined(prefix)
    lake = Lake(str(tmp_path / "lake"))
    commit_with_retries = commits.commit_with_retries

    def commit_refused(commit, what: str, precondition=None) -> None:
        if what.endswith(f"of {tables.IMAGE_EMBEDDINGS}"):
            raise LakeError("the commit was refused (test)")  # a permanent failure: no step retry
        commit_with_retries(commit, what, precondition)

    monkeypatch.setattr(commits, "commit_with_retries", commit_refused)
    success, _ = _run_prefix(own_instance, prefix)
    assert not success
    # Nothing of the partition was committed (a streamed first write may have created the table empty).
    assert not lake.exists(tables.IMAGE_EMBEDDINGS) or lake.read(tables.IMAGE_EMBEDDINGS, prefix).num_rows == 0
    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, prefix, _model_id())
    assert len(staging.staged_files()) == -(-total // BATCH_SIZE)  # one file per model batch

    monkeypatch.setattr(commits, "commit_with_retries", commit_with_retries)
    success, run_id = _run_prefix(own_instance, prefix)
    assert success
    metadata = _embedding_metadata(own_instance)
    assert (metadata["images_embedded"], metadata["images_resumed"], metadata["images_reused"]) == (0, total, total)
    assert metadata["weights"] == "model not loaded: every vector was reused"
    assert any("resumed an interrupted attempt" in line for line in _messages(own_instance, run_id))
    ids = lake.read(tables.IMAGE_EMBEDDINGS, prefix).column("image_id").to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == total
    assert staging.staged_files() == []


def _model_id(**settings: object) -> str:
    return model_id_for(EmbeddingSettings(**{**SMALL_MODEL, **settings}))


# --- SIGKILL at ~80% of a 2,000-photo partition, as a user runs it ----------------------------------------------

KILL_PREFIX = "2026-12-01"
KILL_IMAGES = int(os.environ.get("IMGEMB_TEST_RESUME_IMAGES", "2000"))  # smaller only to iterate on the test
KILL_BATCH = 16  # the CPU default
KILL_AT = 0.8


def _photo_partition(root: Path, images: int) -> SampleDataset:
    """`images` small JPEGs in one prefix, every one with a sales row."""
    rng = np.random.default_rng(11)
    folder = root / "raw-images" / KILL_PREFIX
    folder.mkdir(parents=True)
    ids = [f"img_{number:05d}" for number in range(images)]
    for image_id in ids:
        synthetic_photo(rng, 64, 48).save(folder / f"{image_id}.jpg", format="JPEG", quality=85)
    write_sales_export(root / "sales-data", ids, rng)
    return SampleDataset(
        root=str(root),
        raw_images_uri=str(root / "raw-images"),
        sales_uri=str(root / "sales-data"),
        prefixes=[KILL_PREFIX],
        image_ids={KILL_PREFIX: ids},
        broken_files={KILL_PREFIX: []},
        sales_image_ids=ids,
    )


UPSTREAM = ",".join(
    [
        tables.SALES,
        tables.RAW_IMAGE_MANIFEST,
        tables.DOWNSCALED_IMAGES,
        tables.REJECTED_IMAGES,
        tables.IMAGES_WITH_SALES,
    ]
)


def _materialize(
    env: dict[str, str], cwd: Path, selection: str, config: Path | None, **popen: object
) -> subprocess.Popen:
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "asset", "materialize", "-m", "imgemb_assets.definitions"]
    if config is not None:
        command += ["-c", str(config)]
    return subprocess.Popen([*command, "--select", selection, "--partition", KILL_PREFIX], cwd=cwd, env=env, **popen)


def _run_to_completion(env: dict[str, str], cwd: Path, selection: str, config: Path | None) -> None:
    process = _materialize(env, cwd, selection, config, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]


@pytest.mark.slow
def test_sigkill_at_80_percent_then_a_rerun_resumes_from_the_staged_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = _photo_partition(tmp_path / "data", KILL_IMAGES)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [KILL_PREFIX])
    lake = Lake(str(tmp_path / "lake"))
    env = user_shell_env({}) | code_location_env(dataset, lake.root_uri, dagster_home=home)
    config = tmp_path / "run_config.json"  # JSON is YAML
    model_config = {**SMALL_MODEL, "batch_size": KILL_BATCH}
    config.write_text(json.dumps({"resources": {"embedding_model": {"config": model_config}}}))
    _run_to_completion(env, tmp_path, UPSTREAM, None)  # the joined rows, once
    assert lake.read(tables.IMAGES_WITH_SALES, KILL_PREFIX).num_rows == KILL_IMAGES

    staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, KILL_PREFIX, _model_id(batch_size=KILL_BATCH))
    log_path = tmp_path / "killed-run.log"
    with log_path.open("w") as log:
        process = _materialize(
            env, tmp_path, tables.IMAGE_EMBEDDINGS, config, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        started = time.monotonic()
        # Every staged file but the last of a joined batch holds KILL_BATCH rows.
        while len(staging.staged_files()) * KILL_BATCH < KILL_AT * KILL_IMAGES:
            assert process.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() - started < 900, "the run never staged 80% of the partition"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # the run and its step process
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not lake.exists(tables.IMAGE_EMBEDDINGS)  # killed before its commit: nothing committed
    staged_before = sum(batch.num_rows for batch in staging.read())
    assert staging.files_ignored == 0  # every staged file appeared whole
    assert 0.75 * KILL_IMAGES <= staged_before < KILL_IMAGES

    rerun_started = time.monotonic()
    _run_to_completion(env, tmp_path, tables.IMAGE_EMBEDDINGS, config)
    rerun_seconds = time.monotonic() - rerun_started
    with DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(AssetKey(tables.IMAGE_EMBEDDINGS))
        metadata = {key: value.value for key, value in event.asset_materialization.metadata.items()}
        messages = _messages(instance, event.run_id)
    embedded, resumed = metadata["images_embedded"], metadata["images_resumed"]
    print(
        f"\nkill test: {staged_before} of {KILL_IMAGES} images staged before the kill; the rerun embedded "
        f"{embedded}, reused {resumed} staged vectors, in {rerun_seconds:.1f} s"
    )
    # At most one batch per worker (one worker here) goes through the model again.
    assert embedded <= KILL_IMAGES - staged_before + KILL_BATCH
    assert resumed == staged_before and embedded + resumed == KILL_IMAGES
    assert metadata["progress_total"] == metadata["progress_done"] == KILL_IMAGES
    assert any(f"embedding: done, {KILL_IMAGES}/{KILL_IMAGES}" in line for line in messages), messages
    assert any(f"resumed an interrupted attempt: {resumed} staged vectors" in line for line in messages)

    # One commit, each photo once; the staged batches are gone.
    table = lake.read(tables.IMAGE_EMBEDDINGS, KILL_PREFIX)
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == KILL_IMAGES
    # One commit wrote the partition (the table was created empty just before it).
    operations = [entry["operation"] for entry in DeltaTable(lake.table_uri(tables.IMAGE_EMBEDDINGS)).history()]
    assert operations == ["WRITE", "CREATE TABLE"]
    assert staging.staged_files() == []
