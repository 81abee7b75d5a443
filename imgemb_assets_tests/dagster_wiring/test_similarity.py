"""The search index and near-duplicate assets on the sample data: what they find, what they read again, and that
vectors of two models never meet (with the UI marking partitions embedded with other weights stale)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.core.search.index.errors import ModelMismatch
from imgemb_assets.core.search.index.persistence import index_folder_uri, load_index
from imgemb_assets.core.search.index.stored import stored_model_ids
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import (
    NEAR_DUPLICATE_SHARE_CHECK,
    PREFIX_JOB_NAME,
    SEARCH_INDEX,
    SEARCH_INDEX_JOB_NAME,
    SEARCH_INDEX_POOL,
)
from imgemb_assets.definitions import build_definitions

MODEL_A = "torchvision/resnet50/random-seed0/fp32"
MODEL_B = "torchvision/resnet50/random-seed1/fp32"


def _embed(instance: DagsterInstance, prefixes: list[str]) -> None:
    defs = build_definitions(LocationSettings())  # the weights as the environment says now
    for prefix in prefixes:
        assert defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(instance=instance, partition_key=prefix).success


def _refresh(instance: DagsterInstance) -> ExecuteInProcessResult:
    result = (
        build_definitions(LocationSettings())
        .resolve_job_def(SEARCH_INDEX_JOB_NAME)
        .execute_in_process(instance=instance)
    )
    assert result.success
    return result


def _index_metadata(result: ExecuteInProcessResult) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(SEARCH_INDEX)]
    return {key: value.value for key, value in event.step_materialization_data.materialization.metadata.items()}


def test_each_image_finds_itself_first_and_a_copy_in_another_prefix_is_a_near_duplicate(
    own_dataset: SampleDataset, own_instance: DagsterInstance, tmp_path: Path
) -> None:
    first, second = own_dataset.prefixes[:2]
    with_image = {image_id for ids in own_dataset.image_ids.values() for image_id in ids}
    spare_id = sorted(set(own_dataset.sales_image_ids) - with_image)[0]  # a sales row without a photo
    original = next(i for i in own_dataset.image_ids[first] if i in own_dataset.sales_image_ids)
    (source,) = (Path(own_dataset.raw_images_uri) / first).glob(f"{original}.*")
    shutil.copy(source, Path(own_dataset.raw_images_uri) / second / f"{spare_id}{source.suffix}")
    _embed(own_instance, [first, second])
    result = _refresh(own_instance)
    metadata = _index_metadata(result)

    lake = Lake(str(tmp_path / "lake"))
    index = load_index(lake, MODEL_A)
    embedded = {
        prefix: lake.read(tables.IMAGE_EMBEDDINGS, prefix).column("image_id").to_pylist() for prefix in (first, second)
    }
    assert index.partition_counts() == {prefix: len(ids) for prefix, ids in embedded.items()}
    copies = {(first, original), (second, spare_id)}
    for prefix, ids in embedded.items():
        for image_id in ids:
            hits = index.search(index.vector_of(image_id, prefix=prefix)[None], 2)[0]
            if (prefix, image_id) in copies:  # two equal vectors: either may come first
                assert {(hit.prefix, hit.image_id) for hit in hits} == copies
            else:
                assert (hits[0].prefix, hits[0].image_id) == (prefix, image_id)
    pairs = lake.read(tables.NEAR_DUPLICATES).to_pylist()
    planted = [p for p in pairs if {(p["prefix"], p["image_id"]), (p["other_prefix"], p["other_image_id"])}
               == {(first, original), (second, spare_id)}]  # fmt: skip
    assert planted and all(p["similarity"] > 0.999 and not p["same_partition"] for p in planted)
    assert metadata["vectors_indexed"] == sum(len(ids) for ids in embedded.values())
    assert metadata["recall_at_10"] == 1.0 and metadata["backend"] == "exact"
    assert metadata["partitions_read"] == 2 and metadata["neighbours_sheet"].startswith("![")
    (pairs_event,) = [
        e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(tables.NEAR_DUPLICATES)
    ]
    assert (
        "random, untrained weights" in pairs_event.step_materialization_data.materialization.metadata["warning"].value
    )

    # Only the partition written again is read again.
    _embed(own_instance, [second])
    again = _refresh(own_instance)
    assert _index_metadata(again)["partitions_read"] == 1
    (check,) = again.get_asset_check_evaluations()
    assert check.check_name == NEAR_DUPLICATE_SHARE_CHECK and check.passed


def test_other_weights_get_their_own_index_and_the_ui_marks_partitions_embedded_before_stale(
    own_dataset: SampleDataset, own_instance: DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = own_dataset.prefixes[:2]
    _embed(own_instance, [first, second])
    _refresh(own_instance)
    monkeypatch.setenv("IMGEMB_MODEL_WEIGHTS", "random:1")
    graph = build_definitions(LocationSettings()).resolve_asset_graph()

    def status(prefix: str) -> StaleStatus:
        resolver = CachingStaleStatusResolver(own_instance, graph, LoadingContextForTest(own_instance))
        return resolver.get_status(AssetKey(tables.IMAGE_EMBEDDINGS), prefix)

    assert status(first) == status(second) == StaleStatus.STALE  # the weights changed since they were embedded
    _embed(own_instance, [first])
    _refresh(own_instance)
    assert (status(first), status(second)) == (StaleStatus.FRESH, StaleStatus.STALE)

    lake = Lake(str(tmp_path / "lake"))
    assert stored_model_ids(lake) == [MODEL_A, MODEL_B]
    old, new = load_index(lake, MODEL_A), load_index(lake, MODEL_B)
    embedded = lake.read(tables.IMAGE_EMBEDDINGS, first).column("image_id").to_pylist()
    assert new.partition_counts() == {first: len(embedded), second: 0}
    assert old.partition_counts()[first] == 0 and old.partition_counts()[second] > 0
    hits = new.search(new.vector_of(embedded[0], prefix=first)[None], 50)[0]
    assert {hit.prefix for hit in hits} == {first}, "an index never holds another model's vectors"
    with pytest.raises(ModelMismatch):
        new.search(old.vector_of(_ids(lake, second)[0], prefix=second)[None], 5, model_id=MODEL_A)


def _ids(lake: Lake, prefix: str) -> list[str]:
    return lake.read(tables.IMAGE_EMBEDDINGS, prefix).column("image_id").to_pylist()


def test_the_refresh_step_queues_in_its_pool_and_rebuilds_a_damaged_index_saying_so(
    own_dataset: SampleDataset, own_instance: DagsterInstance, tmp_path: Path
) -> None:
    defs = build_definitions(LocationSettings())
    assert defs.resolve_assets_def(AssetKey(SEARCH_INDEX)).node_def.pool == SEARCH_INDEX_POOL
    first = own_dataset.prefixes[0]
    _embed(own_instance, [first])
    _refresh(own_instance)
    lake = Lake(str(tmp_path / "lake"))
    folder = Path(index_folder_uri(lake, MODEL_A))
    (segment,) = (folder / "segments").iterdir()
    segment.write_bytes(segment.read_bytes()[:100])  # truncated

    rebuilt = _index_metadata(_refresh(own_instance))["indexes_rebuilt"]
    assert list(rebuilt) == [MODEL_A] and segment.name in rebuilt[MODEL_A]
    embedded = lake.read(tables.IMAGE_EMBEDDINGS, first).num_rows
    assert load_index(lake, MODEL_A).partition_counts() == {first: embedded}
