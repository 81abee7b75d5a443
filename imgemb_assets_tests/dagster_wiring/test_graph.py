"""The whole graph materialized through Dagster for two partitions, on a test instance and a local lake."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance, ExecuteInProcessResult

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.sample.dataset import SampleDataset
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions

defs = build_definitions(LocationSettings())


@pytest.fixture
def instance(
    small_dataset: SampleDataset, location_instance_for: Callable[[SampleDataset], DagsterInstance]
) -> DagsterInstance:
    return location_instance_for(small_dataset)


def _run_all(instance: DagsterInstance, prefixes: list[str]) -> list[ExecuteInProcessResult]:
    results = [defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance)]
    for prefix in prefixes:
        results.append(
            defs.resolve_job_def(PREFIX_JOB_NAME).execute_in_process(instance=instance, partition_key=prefix)
        )
    assert all(result.success for result in results)
    return results


def _counts(lake: Lake, prefix: str) -> dict[str, int]:
    return {name: lake.read(name, prefix).num_rows for name in tables.ALL_TABLES if name != tables.SALES}


def _reported(results: list[ExecuteInProcessResult]) -> list[tuple[str, str | None, dict]]:
    """(asset, partition, metadata) of every materialization the runs reported, in order."""
    out = []
    for result in results:
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            metadata = {key: value.value for key, value in materialization.metadata.items()}
            out.append((materialization.asset_key.to_user_string(), materialization.partition, metadata))
    return out


def _metadata(results: list[ExecuteInProcessResult], asset: str) -> list[dict]:
    out = []
    for result in results:
        for event in result.get_asset_materialization_events():
            materialization = event.step_materialization_data.materialization
            if materialization.asset_key.to_user_string() == asset:
                out.append({key: value.value for key, value in materialization.metadata.items()})
    return out


def test_two_partitions_give_the_expected_rows_in_every_table(
    instance: DagsterInstance, small_dataset: SampleDataset, tmp_path: Path
) -> None:
    results = _run_all(instance, small_dataset.prefixes)
    lake = Lake(str(tmp_path / "lake"))
    # the rows each table should hold, from the sample: (table, prefix or None for sales) -> rows
    expected: dict[tuple[str, str | None], int] = {(tables.SALES, None): len(small_dataset.sales_image_ids)}
    for prefix in small_dataset.prefixes:
        images, broken = small_dataset.image_ids[prefix], small_dataset.broken_files[prefix]
        assert broken, "each prefix of the sample holds broken files"
        assert 0 < small_dataset.expected_joined(prefix) < len(images), "some images have no sales row"
        expected |= {
            (tables.RAW_IMAGE_MANIFEST, prefix): len(images) + len(broken),
            (tables.DOWNSCALED_IMAGES, prefix): len(images),
            (tables.REJECTED_IMAGES, prefix): len(broken),
            (tables.IMAGES_WITH_SALES, prefix): small_dataset.expected_joined(prefix),
            (tables.IMAGE_EMBEDDINGS, prefix): small_dataset.expected_joined(prefix),
        }
    assert {key[0] for key in expected} == set(tables.ALL_TABLES)
    assert lake.read(tables.SALES).num_rows == expected[(tables.SALES, None)]
    for prefix in small_dataset.prefixes:
        assert _counts(lake, prefix) == {name: rows for (name, at), rows in expected.items() if at == prefix}
        rejected = lake.read(tables.REJECTED_IMAGES, prefix).to_pylist()
        assert sorted(Path(row["uri"]).name for row in rejected) == sorted(small_dataset.broken_files[prefix])
        assert all(row["reason"] for row in rejected)
    # every table reported one materialization per partition (sales one in all), each with the rows
    # its partition holds, where its table is, and the columns it holds
    reported = [(name, at, metadata) for name, at, metadata in _reported(results) if name in tables.ALL_TABLES]
    assert sorted((name, at or "") for name, at, _ in reported) == sorted((name, at or "") for name, at in expected)
    for name, at, metadata in reported:
        assert metadata["dagster/row_count"] == expected[(name, at)], (name, at)
        assert metadata["table_uri"] == lake.table_uri(name)
        columns = lake.read(name).column_names
        assert [column.name for column in metadata["dagster/column_schema"].columns] == columns, name


def test_embedding_rows_carry_sales_columns_vectors_and_model_id(
    instance: DagsterInstance, small_dataset: SampleDataset, tmp_path: Path
) -> None:
    results = _run_all(instance, small_dataset.prefixes[:1])
    prefix = small_dataset.prefixes[0]
    lake = Lake(str(tmp_path / "lake"))
    embeddings = lake.read(tables.IMAGE_EMBEDDINGS, prefix)
    assert embeddings.column_names == [
        "image_id",
        "prefix",
        "etag",
        "sales",
        "category",
        "price",
        "embedding",
        "model_id",
    ]
    assert {len(vector) for vector in embeddings.column("embedding").to_pylist()} == {2048}
    assert set(embeddings.column("model_id").to_pylist()) == {"torchvision/resnet50/random-seed0/fp32"}
    manifest_etags = {r["image_id"]: r["etag"] for r in lake.read(tables.RAW_IMAGE_MANIFEST, prefix).to_pylist()}
    assert all(manifest_etags[r["image_id"]] == r["etag"] for r in embeddings.select(["image_id", "etag"]).to_pylist())
    (metadata,) = _metadata(results, tables.IMAGE_EMBEDDINGS)
    assert metadata["model_id"] == "torchvision/resnet50/random-seed0/fp32"
    assert "RANDOM" in metadata["weights"]
    assert metadata["embedding_width"] == 2048
    # The same run evaluated the partition against the sales table's category, labelled meaningless.
    (evaluation,) = lake.read(tables.EMBEDDING_EVALUATION, prefix).to_pylist()
    assert evaluation["model_id"] == metadata["model_id"] and evaluation["label_column"] == "category"
    assert evaluation["weights_are_random"] and evaluation["vectors"] == embeddings.num_rows
    assert evaluation["silhouette"] is not None and -1 <= evaluation["silhouette"] <= 1
    (evaluated,) = _metadata(results, tables.EMBEDDING_EVALUATION)
    assert "random, untrained weights" in evaluated["warning"] and "random, untrained weights" in evaluated["summary"]
    assert evaluated["silhouette"] == round(evaluation["silhouette"], 4)
    # ResNet50 has no text tower: null zero-shot columns, no zero-shot row, nothing to explain.
    assert (evaluation["zero_shot_agreement"], evaluation["zero_shot_agreement_chance"]) == (None, None)
    assert evaluation["zero_shot_classes"] is None
    assert not [key for key in evaluated if key.startswith("zero_shot")] and "zero-shot" not in evaluated["summary"]


def test_rerunning_a_partition_replaces_it_without_duplicates(
    instance: DagsterInstance, small_dataset: SampleDataset, tmp_path: Path
) -> None:
    _run_all(instance, small_dataset.prefixes)
    lake = Lake(str(tmp_path / "lake"))
    before = {prefix: _counts(lake, prefix) for prefix in small_dataset.prefixes}
    first_vectors = lake.read(tables.IMAGE_EMBEDDINGS, small_dataset.prefixes[0]).sort_by("image_id")
    _run_all(instance, small_dataset.prefixes[:1])
    assert {prefix: _counts(lake, prefix) for prefix in small_dataset.prefixes} == before
    assert lake.read(tables.IMAGE_EMBEDDINGS, small_dataset.prefixes[0]).sort_by("image_id").equals(first_vectors)


def test_missing_environment_variable_fails_the_run_clearly(
    instance: DagsterInstance, small_dataset: SampleDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMGEMB_LAKE_URI")
    with pytest.raises(Exception, match="IMGEMB_LAKE_URI"):
        defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance)
