"""The running system: `dagster dev` (webserver and daemon) against the moto S3 server with the sensors on.

A prefix dropped into the bucket gets its embeddings without anyone touching
anything; a materialization launched through the GraphQL API the UI uses
succeeds; the server stops by its process group with no process left behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus
from dagster._core.instance.ref import InstanceRef
from dagster_graphql import DagsterGraphQLClient

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.errors import LakeError
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.dagster_webserver import webserver_answers
from imgemb_support.location import as_from_a_terminal, code_location_env, upload_tree, user_shell_env, wait_for
from imgemb_support.moto_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 420
DAGSTER = str(Path(sys.executable).with_name("dagster"))
# What `dagster dev` passes to its code server as --heartbeat-timeout.
_CODE_SERVER_HEARTBEAT_TIMEOUT_S = 45


@pytest.fixture
def dagster_dev(small_dataset: SampleDataset, bucket: str, tmp_path: Path) -> Iterator[tuple[int, Path, Lake]]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    client = S3Settings().client()
    upload_tree(client, Path(small_dataset.sales_uri), bucket, "sales-data")
    client.put_object(Bucket=bucket, Key="raw-images/", Body=b"")  # the root exists, with no prefix yet
    location = code_location_env(small_dataset, f"s3://{bucket}/delta", dagster_home=home)
    location |= {"IMGEMB_RAW_IMAGES_URI": f"s3://{bucket}/raw-images", "IMGEMB_SALES_URI": f"s3://{bucket}/sales-data"}
    env = user_shell_env(location)
    port = free_port()
    log = tmp_path / "dagster-dev.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            as_from_a_terminal([DAGSTER, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]),
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so one signal reaches every child
        )
    pgid = os.getpgid(process.pid)
    try:
        wait_for("the webserver", lambda: webserver_answers(port), 180, log, poll_s=2)
        yield port, log, Lake(f"s3://{bucket}/delta", storage_options=S3Settings().delta_storage_options())
    finally:
        # Runs that automation started last are let finish first: this fixture is about the sensor and UI
        # path, not about interrupting runs. (`dagster dev` that never stopped on SIGTERM, seen in full runs
        # only, had inherited SIGINT ignored from a background start: see `as_from_a_terminal`.)
        _wait_for_runs_to_finish(home, timeout_s=240)
        os.killpg(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            still_running = "\n".join(_group_processes(pgid))
            os.killpg(pgid, signal.SIGKILL)
            pytest.fail(f"dagster dev did not stop on SIGTERM; still running:\n{still_running}")
        # `dagster dev` can restart its code server while shutting down ("Code server process
        # has exited with code 0. Restarting the code server process."), after the group was
        # signalled; that one stops itself once its heartbeat is gone, after its 45 s
        # --heartbeat-timeout. A process still there after that is left behind.
        deadline = time.monotonic() + _CODE_SERVER_HEARTBEAT_TIMEOUT_S + 45
        while _group_processes(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = _group_processes(pgid)
        if leftover:
            os.killpg(pgid, signal.SIGKILL)
        assert not leftover, "processes of dagster dev were left behind:\n" + "\n".join(leftover)


def test_dagster_dev_is_started_with_sigint_at_its_default_even_when_the_tests_ignore_it() -> None:
    """Else `dagster dev` would ignore SIGTERM and never stop (see `as_from_a_terminal`)."""
    shows_sigint = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background start of the tests
    try:
        plain = subprocess.run(shows_sigint, capture_output=True, text=True, check=True).stdout.strip()
        shimmed = subprocess.run(as_from_a_terminal(shows_sigint), capture_output=True, text=True, check=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain == str(int(signal.SIG_IGN))  # what dagster dev would inherit without the shim
    assert shimmed.stdout.strip() == repr(signal.default_int_handler)


def _wait_for_runs_to_finish(home: Path, timeout_s: float) -> None:
    """Until no run of the instance is queued or in progress and no backfill waits to launch one (or `timeout_s`).

    Automation requests what follows the embeddings (the search index) as a backfill, which the
    backfill daemon launches on its own loop: with no run in flight a run may still be about to start.
    """
    in_flight = [
        DagsterRunStatus.QUEUED,
        DagsterRunStatus.NOT_STARTED,
        DagsterRunStatus.STARTING,
        DagsterRunStatus.STARTED,
    ]
    requested = BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED])
    deadline = time.monotonic() + timeout_s
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        while time.monotonic() < deadline and (
            instance.get_runs_count(RunsFilter(statuses=in_flight)) or instance.get_backfills(filters=requested)
        ):
            time.sleep(1)


def _group_processes(pgid: int) -> list[str]:
    """The processes of the group still running: pid, state, age and command line.

    A zombie has exited: it only waits to be reaped by its parent or, once that
    died, by PID 1, which in some containers never reaps. Asking the group with
    `killpg(pgid, 0)` counted those as left behind, now and then.
    """
    done = subprocess.run(["ps", "-eo", "pgid=,pid=,stat=,etime=,args="], capture_output=True, text=True, check=True)
    rows = [line.split(None, 4) for line in done.stdout.splitlines() if line.strip()]
    return [" ".join(row[1:])[:300] for row in rows if row[0] == str(pgid) and not row[2].startswith("Z")]


def _embedded_rows(lake: Lake, prefix: str) -> int:
    try:
        return lake.read(tables.IMAGE_EMBEDDINGS, prefix, columns=["image_id"]).num_rows
    except LakeError:
        return 0


@pytest.mark.slow
def test_sensor_embeds_a_dropped_prefix_and_the_ui_api_launches_a_run(
    dagster_dev: tuple[int, Path, Lake], small_dataset: SampleDataset, bucket: str
) -> None:
    port, log, lake = dagster_dev
    prefix = small_dataset.prefixes[0]
    upload_tree(S3Settings().client(), Path(small_dataset.raw_images_uri) / prefix, bucket, f"raw-images/{prefix}")
    expected = small_dataset.expected_joined(prefix)
    wait_for(f"embeddings of {prefix}", lambda: _embedded_rows(lake, prefix) == expected, DEADLINE_S, log, poll_s=2)

    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_id = client.submit_job_execution(
        "embed_prefix", repository_location_name="imgemb", tags={"dagster/partition": prefix}
    )
    finished = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    wait_for(f"run {run_id}", lambda: client.get_run_status(run_id) in finished, 300, log, poll_s=2)
    assert client.get_run_status(run_id) == DagsterRunStatus.SUCCESS
    assert _embedded_rows(lake, prefix) == expected
    # Automation follows with the evaluation, the search index and its near duplicates (on S3 too).
    passing = {
        "sales": {"unique_image_ids": ("SUCCEEDED", True)},
        "downscaled_images": {"manifest_accounted_for": ("SUCCEEDED", True)},
        "images_with_sales": {"sales_coverage": ("SUCCEEDED", True)},
        "image_embeddings": {"embedding_values": ("SUCCEEDED", True), "embedding_drift": ("SUCCEEDED", True)},
        "near_duplicates": {"near_duplicate_share": ("SUCCEEDED", True)},
    }
    wait_for(
        "every check shown passed", lambda: _asset_checks_shown_by_the_ui(port) == passing, DEADLINE_S, log, poll_s=2
    )
    # Automation may have refreshed the index before any partition was embedded (an empty index)
    # and refreshes it again after each embedding run: wait for the refresh that holds the prefix.
    wait_for(
        "the search index of the prefix",
        lambda: _latest_metadata_shown_by_the_ui(port, "image_search_index")["vectors_indexed"] == expected,
        DEADLINE_S, log, poll_s=2,
    )  # fmt: skip
    index = _latest_metadata_shown_by_the_ui(port, "image_search_index")
    assert index["vectors_indexed"] == expected and index["recall_at_10"] == 1.0
    assert index["neighbours_sheet"].startswith("![") and "data:image/jpeg;base64," in index["neighbours_sheet"]
    evaluation = _latest_metadata_shown_by_the_ui(port, "embedding_evaluation")
    assert "random, untrained weights" in evaluation["warning"] and evaluation["label_column"] == "category"
    columns = _latest_metadata_shown_by_the_ui(port, "image_embeddings")["dagster/column_schema"]
    assert [column["name"] for column in columns][-2:] == ["embedding", "model_id"]

    # A second export repeating three image_ids: the UI shows the blocking check failed.
    sales = pq.read_table(Path(small_dataset.sales_uri) / "sales.parquet").slice(0, 3)
    buffer = io.BytesIO()
    pq.write_table(sales, buffer)
    S3Settings().client().put_object(Bucket=bucket, Key="sales-data/late-corrections.parquet", Body=buffer.getvalue())
    sales_run = client.submit_job_execution("refresh_sales", repository_location_name="imgemb")
    wait_for(f"run {sales_run}", lambda: client.get_run_status(sales_run) in finished, 300, log, poll_s=2)

    def sales_check() -> tuple[str, bool]:
        return _asset_checks_shown_by_the_ui(port)["sales"]["unique_image_ids"]

    # The sales sensor may have started its own refresh of the same export meanwhile.
    wait_for("the sales check to finish", lambda: sales_check()[0] != "IN_PROGRESS", 300, log, poll_s=2)
    assert sales_check() == ("FAILED", False)


_ASSET_CHECKS_QUERY = """
{ assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks {
    name executionForLatestMaterialization { status evaluation { success } } } } } } }
"""


def _asset_checks_shown_by_the_ui(port: int) -> dict[str, dict[str, tuple[str, bool]]]:
    """Each asset's checks with the status and outcome of their latest execution, as the UI's API serves them."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": _ASSET_CHECKS_QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        nodes = json.loads(response.read())["data"]["assetNodes"]
    shown: dict[str, dict[str, tuple[str, bool]]] = {}
    for node in nodes:
        checks = node["assetChecksOrError"].get("checks") or []
        for check in checks:
            execution = check["executionForLatestMaterialization"] or {}
            evaluation = execution.get("evaluation") or {}
            shown.setdefault("/".join(node["assetKey"]["path"]), {})[check["name"]] = (
                execution.get("status"),
                evaluation.get("success"),
            )
    return shown


_LATEST_METADATA_QUERY = """
query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  assetMaterializations(limit: 1) { metadataEntries { label
    ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
    ... on TextMetadataEntry { text } ... on MarkdownMetadataEntry { mdStr } ... on BoolMetadataEntry { boolValue }
    ... on TableSchemaMetadataEntry { schema { columns { name type } } } } } } } }
"""


def _latest_metadata_shown_by_the_ui(port: int, asset: str) -> dict[str, object]:
    """The metadata of the asset's latest materialization, as the UI's API serves it (label -> value)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": _LATEST_METADATA_QUERY, "variables": {"key": {"path": [asset]}}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (materialization,) = json.loads(response.read())["data"]["assetNodeOrError"]["assetMaterializations"]
    values: dict[str, object] = {}
    for entry in materialization["metadataEntries"]:
        value = next((v for k, v in entry.items() if k != "label"), None)
        values[entry["label"]] = value["columns"] if isinstance(value, dict) and "columns" in value else value
    return values
