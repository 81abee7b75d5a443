"""Correct under change: a partition whose later step failed stays stale and is requested again,
and a listing that returns to an earlier state is followed like any other change.

Automation is evaluated with Dagster's own tester against a real instance; runs are
real in-process runs of the location's jobs, so the events automation reads are the
ones a daemon would read.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pytest
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    ExecuteInProcessResult,
    evaluate_automation_conditions,
)
from dagster._core.definitions.asset_daemon_cursor import AssetDaemonCursor
from PIL import Image

from imgemb_assets.cli import main as cli
from imgemb_assets.core.ingest.discovery import listing_fingerprint
from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.storage.local_store import LocalObjectStore
from imgemb_assets.dagster_wiring.backfills import plan_backfill
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.location.staleness import PartitionStatus, status_in_graph
from imgemb_assets.dagster_wiring.names import LISTING_FINGERPRINT_KEY, PREFIX_JOB_NAME, RAW_IMAGES, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions

defs = build_definitions(LocationSettings())


class Ticks:
    """Successive automation evaluations, as the daemon's sensor would make them."""

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance
        self.cursor: AssetDaemonCursor | None = None

    def requested(self, asset: str, at: datetime | None = None) -> list[str]:
        result = evaluate_automation_conditions(
            defs=defs, instance=self.instance, cursor=self.cursor, evaluation_time=at
        )
        self.cursor = result.cursor
        return sorted(result.get_requested_partitions(AssetKey(asset)))


# The assets of a prefix, selected as the UI, backfills and automation select them:
# a run that carries its asset selection lets automation tell that a downstream
# asset was updated by the same run as its upstream.
_PREFIX_ASSETS = [
    AssetKey(name)
    for name in (
        tables.RAW_IMAGE_MANIFEST,
        tables.DOWNSCALED_IMAGES,
        tables.REJECTED_IMAGES,
        tables.IMAGES_WITH_SALES,
        tables.IMAGE_EMBEDDINGS,
    )
]


def _run_prefix(instance: DagsterInstance, prefix: str) -> ExecuteInProcessResult:
    return defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(
        instance=instance, partition_key=prefix, asset_selection=_PREFIX_ASSETS, raise_on_error=False
    )


def _report_listing(instance: DagsterInstance, root: Path, prefix: str) -> None:
    """What the discovery sensor reports when a prefix's listing changed."""
    fingerprint = listing_fingerprint(LocalObjectStore(root).list_objects(prefix))
    instance.report_runless_asset_event(
        AssetMaterialization(RAW_IMAGES, partition=prefix, metadata={LISTING_FINGERPRINT_KEY: fingerprint})
    )


def _image_path(own_dataset: SampleDataset, prefix: str, image_id: str) -> Path:
    (path,) = (Path(own_dataset.raw_images_uri) / prefix).glob(f"{image_id}.*")
    return path


def _joined_image_id(own_dataset: SampleDataset, prefix: str) -> str:
    return next(i for i in sorted(own_dataset.image_ids[prefix]) if i in set(own_dataset.sales_image_ids))


def _vector(lake: Lake, prefix: str, image_id: str) -> list[float]:
    table = lake.read(tables.IMAGE_EMBEDDINGS, prefix)
    return table.filter(pc.equal(table["image_id"], image_id))["embedding"][0].as_py()


def test_a_partition_whose_embedding_step_failed_is_requested_again_and_ends_up_current(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = own_dataset.prefixes[0]
    lake = Lake(str(tmp_path / "lake"))
    for each in own_dataset.prefixes:
        assert _run_prefix(own_instance, each).success
    ticks = Ticks(own_instance)
    assert ticks.requested(tables.IMAGE_EMBEDDINGS) == []

    # One image's content changes; the sensor reports the new listing.
    image_id = _joined_image_id(own_dataset, prefix)
    path = _image_path(own_dataset, prefix, image_id)
    Image.new("RGB", (64, 48), (250, 10, 10)).save(path, format=Image.open(path).format)
    vector_before = _vector(lake, prefix, image_id)
    _report_listing(own_instance, Path(own_dataset.raw_images_uri), prefix)
    assert prefix in ticks.requested(tables.IMAGE_EMBEDDINGS)

    # The requested run fails in the embedding step (the weights file is unreadable for now).
    monkeypatch.setenv("IMGEMB_MODEL_WEIGHTS", str(tmp_path / "not-there.pt"))
    failed = _run_prefix(own_instance, prefix)
    assert not failed.success
    assert [e.step_key for e in failed.get_step_failure_events()] == [tables.IMAGE_EMBEDDINGS]
    assert _vector(lake, prefix, image_id) == vector_before  # the stale vector is still there

    # `imgemb backfill-missing` takes it up too: the embedding step alone.
    plan = plan_backfill(own_instance, tables.IMAGE_EMBEDDINGS, LocalObjectStore(Path(own_dataset.sales_uri)))
    assert dict(plan.tables_by_prefix) == {prefix: (tables.IMAGE_EMBEDDINGS,)} and not plan.refresh_sales

    # Not on every tick: a failure that needs a person must not launch a run a minute.
    now = datetime.now(UTC)
    assert prefix not in ticks.requested(tables.IMAGE_EMBEDDINGS, at=now)
    # On the next tick of the retry cron it is requested again, alone: its upstream is current.
    retry_at = now + timedelta(hours=1, minutes=1)
    assert ticks.requested(tables.IMAGE_EMBEDDINGS, at=retry_at) == [prefix]
    assert ticks.cursor is not None
    for upstream in (tables.RAW_IMAGE_MANIFEST, tables.DOWNSCALED_IMAGES, tables.IMAGES_WITH_SALES):
        assert prefix not in ticks.requested(upstream, at=retry_at)

    # The cause is fixed; the rerun brings the vector up to date and nothing stays stale.
    monkeypatch.setenv("IMGEMB_MODEL_WEIGHTS", "random")
    assert _run_prefix(own_instance, prefix).success
    assert _vector(lake, prefix, image_id) != vector_before
    later = retry_at + timedelta(hours=2)
    assert prefix not in ticks.requested(tables.IMAGE_EMBEDDINGS, at=later)


def test_a_listing_that_returns_to_an_earlier_state_is_requested_again(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path
) -> None:
    """A -> A+x -> A: each change is a new report, never a run key that already ran."""
    prefix = own_dataset.prefixes[0]
    root = Path(own_dataset.raw_images_uri)
    for each in own_dataset.prefixes:
        assert _run_prefix(own_instance, each).success
    ticks = Ticks(own_instance)
    assert ticks.requested(tables.RAW_IMAGE_MANIFEST) == []

    extra = root / prefix / "uploaded-then-deleted.jpg"
    for change in ("upload", "delete"):
        if change == "upload":
            Image.new("RGB", (32, 32), (0, 200, 0)).save(extra, format="JPEG")
        else:
            extra.unlink()
        _report_listing(own_instance, root, prefix)
        assert ticks.requested(tables.RAW_IMAGE_MANIFEST) == [prefix], change
        assert _run_prefix(own_instance, prefix).success
        manifest = Lake(str(tmp_path / "lake")).read(tables.RAW_IMAGE_MANIFEST, prefix)
        assert ("uploaded-then-deleted" in manifest["image_id"].to_pylist()) == (change == "upload")


def test_the_status_names_the_partitions_written_before_their_upstream_changed(
    own_instance: DagsterInstance, own_dataset: SampleDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = own_dataset.prefixes
    assert _run_prefix(own_instance, first).success
    assert status_in_graph(own_instance, defs, tables.IMAGE_EMBEDDINGS, own_dataset.prefixes) == PartitionStatus(
        tables.IMAGE_EMBEDDINGS, missing=[second], stale={}
    )
    # A changed listing makes the manifest stale; a failed embedding step leaves the embeddings stale.
    _report_listing(own_instance, Path(own_dataset.raw_images_uri), first)
    assert status_in_graph(own_instance, defs, tables.RAW_IMAGE_MANIFEST, [first]).stale == {first: [RAW_IMAGES]}
    monkeypatch.setenv("IMGEMB_MODEL_WEIGHTS", str(tmp_path / "not-there.pt"))
    assert not _run_prefix(own_instance, first).success
    assert status_in_graph(own_instance, defs, tables.RAW_IMAGE_MANIFEST, [first]).stale == {}
    status = status_in_graph(own_instance, defs, tables.IMAGE_EMBEDDINGS, [first])
    assert status.stale == {first: [tables.IMAGES_WITH_SALES]} and status.not_current == [first]
    # A sales refresh makes every joined partition stale.
    assert defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=own_instance).success
    assert status_in_graph(own_instance, defs, tables.IMAGES_WITH_SALES, own_dataset.prefixes) == PartitionStatus(
        tables.IMAGES_WITH_SALES, missing=[second], stale={first: [tables.SALES]}
    )


def test_imgemb_status_prints_the_missing_and_stale_partitions(
    own_instance: DagsterInstance,
    own_dataset: SampleDataset,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = own_dataset.prefixes
    assert _run_prefix(own_instance, first).success
    _report_listing(own_instance, Path(own_dataset.raw_images_uri), first)
    monkeypatch.setenv(
        "DAGSTER_HOME", own_instance.root_directory
    )  # the command opens the own_instance as a user would
    assert cli.main(["status"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [
        "2 registered prefixes",
        "raw_image_manifest: 0 current, 1 missing, 1 stale",
        f"  missing {second!r}",
    ]
    assert f"  stale   {first!r}: raw_images changed after it was written" in printed
    assert "image_embeddings: 1 current, 1 missing, 0 stale" in printed
