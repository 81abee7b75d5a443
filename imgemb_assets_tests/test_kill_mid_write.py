"""A run killed with SIGKILL while committing the embeddings table: the table keeps its previous version,
and the rerun completes with a clean run's counts.

The run is `dagster asset materialize` (its step in a subprocess, as in production) against the moto
S3 server through the fault proxy, which never answers the PUT of the table's next commit file: the
run is then exactly between writing its data files and committing them when it is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance
from deltalake import DeltaTable

from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.models import model_id_for
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME
from imgemb_support.fault_proxy import running_fault_proxy
from imgemb_support.location import code_location_env, dataset_on_s3, user_shell_env

NEW_WEIGHTS = "random:1"  # the rerun must recompute every vector, so it has something to write


def _materialize(env: dict[str, str], cwd: Path, prefix: str, selection: str, **popen: object) -> subprocess.Popen:
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "asset", "materialize", "-m", "imgemb_assets.definitions"]
    return subprocess.Popen([*command, "--select", selection, "--partition", prefix], cwd=cwd, env=env, **popen)


def _run_to_completion(env: dict[str, str], cwd: Path, prefix: str, selection: str) -> None:
    process = _materialize(env, cwd, prefix, selection, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]


@pytest.mark.slow
def test_sigkill_during_the_commit_keeps_the_previous_version_and_the_rerun_completes(
    small_dataset: SampleDataset, bucket: str, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = dataset_on_s3(small_dataset, bucket)
    prefix = dataset.prefixes[0]
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [prefix])
    lake_uri = f"s3://{bucket}/delta"
    env = user_shell_env({})
    env |= code_location_env(dataset, lake_uri, dagster_home=home)
    _run_to_completion(env, tmp_path, prefix, "*")  # the clean run: every asset

    options = S3Settings().delta_storage_options()
    lake = Lake(lake_uri, storage_options=options)
    embeddings_uri = lake.table_uri(tables.IMAGE_EMBEDDINGS)
    version_before = DeltaTable(embeddings_uri, storage_options=options).version()
    rows_before = lake.read(tables.IMAGE_EMBEDDINGS, prefix).sort_by("image_id")
    assert rows_before.num_rows == small_dataset.expected_joined(prefix)

    log = (tmp_path / "killed-run.log").open("w")
    with running_fault_proxy(moto_endpoint, hold=r"PUT:/image_embeddings/_delta_log/\d+\.json") as proxy:
        killed_env = env | {"AWS_ENDPOINT_URL": proxy.url, "IMGEMB_MODEL_WEIGHTS": NEW_WEIGHTS}
        process = _materialize(
            killed_env, tmp_path, prefix, tables.IMAGE_EMBEDDINGS, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while proxy.stats().get("held", 0) == 0:
            assert process.poll() is None, (tmp_path / "killed-run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached its commit"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)  # the run and its step process
        process.wait()
    log.close()
    assert process.returncode == -signal.SIGKILL

    # The previous version, untouched; the killed run's data files lie beside it, referenced by no commit.
    table = DeltaTable(embeddings_uri, storage_options=options)
    assert table.version() == version_before
    assert lake.read(tables.IMAGE_EMBEDDINGS, prefix).sort_by("image_id").equals(rows_before)
    referenced = {uri.rsplit("/", 1)[-1] for uri in table.file_uris()}
    listed = S3Settings().client().list_objects_v2(Bucket=bucket, Prefix="delta/image_embeddings/")["Contents"]
    data_files = {item["Key"].rsplit("/", 1)[-1] for item in listed if item["Key"].endswith(".parquet")}
    assert data_files - referenced, "the kill was meant to come after the data files were written"

    _run_to_completion(env | {"IMGEMB_MODEL_WEIGHTS": NEW_WEIGHTS}, tmp_path, prefix, tables.IMAGE_EMBEDDINGS)
    after = lake.read(tables.IMAGE_EMBEDDINGS, prefix)
    assert DeltaTable(embeddings_uri, storage_options=options).version() == version_before + 1
    assert sorted(after.column("image_id").to_pylist()) == rows_before.column("image_id").to_pylist()
    assert set(after.column("model_id").to_pylist()) == {model_id_for(EmbeddingSettings(weights=NEW_WEIGHTS))}
