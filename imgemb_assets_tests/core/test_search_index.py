"""The similar-image search index: queries, incremental updates, typed refusals, and persistence on a local
folder and on a real S3 API (the moto server subprocess), with real usearch graphs and real parquet files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imgemb_assets.core.lake import Lake
from imgemb_assets.core.s3 import S3Settings
from imgemb_assets.core.search_index import (
    AmbiguousImageId,
    AnnParameters,
    IndexMissing,
    InvalidPartition,
    ModelMismatch,
    PartitionVectors,
    SearchIndex,
    SearchIndexError,
    UnknownImageId,
    index_folder_uri,
    index_metadata,
    load_index,
    read_partition_models,
    recall_at_k,
    save_index,
    stored_index_bytes,
)

WIDTH = 128
MODEL = "resnet50"


def clustered_vectors(count: int, seed: int, clusters: int = 20, width: int = WIDTH) -> np.ndarray:
    """Non-negative vectors around a few centres, like pooled CNN features of similar products."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((clusters, width))) * (rng.random((clusters, width)) < 0.3)
    points = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, width))
    return np.abs(points).astype(np.float32)


def partition(prefix: str, count: int, seed: int, fingerprint: str = "f1") -> PartitionVectors:
    return PartitionVectors(prefix, fingerprint, [f"{prefix}-img{i:04d}" for i in range(count)], clustered_vectors(count, seed))


def three_partitions() -> list[PartitionVectors]:
    return [partition("2026-11-01", 150, 1), partition("2026-11-02", 150, 2), partition("2026-11-03", 150, 3)]


def ids_and_prefixes(results: list[list]) -> list[list[tuple[str, str]]]:
    return [[(n.image_id, n.prefix) for n in row] for row in results]


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_an_indexed_vector_is_its_own_nearest_neighbour(ann_threshold: int) -> None:
    index = SearchIndex.build(MODEL, WIDTH, three_partitions(), ann_threshold=ann_threshold)
    assert index.uses_ann == (ann_threshold == 100)
    for image_id in ["2026-11-01-img0000", "2026-11-02-img0077", "2026-11-03-img0149"]:
        nearest = index.search(index.vector_of(image_id), k=1)[0][0]
        assert (nearest.image_id, nearest.prefix) == (image_id, image_id[:10])
        assert nearest.similarity == pytest.approx(1.0, abs=1e-3)
        neighbours = index.neighbours_of(image_id, k=5)
        assert len(neighbours) == 5 and image_id not in [n.image_id for n in neighbours]
        assert [n.similarity for n in neighbours] == sorted((n.similarity for n in neighbours), reverse=True)


def test_exact_search_matches_a_brute_force_reference() -> None:
    parts = three_partitions()
    index = SearchIndex.build(MODEL, WIDTH, parts, ann_threshold=10**9)
    everything = np.concatenate([p.vectors for p in parts])
    ids = [i for p in parts for i in p.image_ids]
    queries = clustered_vectors(5, seed=99)
    normalised = everything / np.linalg.norm(everything, axis=1, keepdims=True)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ normalised.T
    for row, found in enumerate(index.search(queries, k=10)):
        assert [n.image_id for n in found] == [ids[i] for i in np.argsort(-scores[row], kind="stable")[:10]]


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_an_incremental_update_equals_a_full_rebuild(ann_threshold: int) -> None:
    first, second, third = three_partitions()
    # tombstones up to the live count allowed, so the graph is updated in place, not rebuilt
    in_place = AnnParameters(rebuild_after_removed_fraction=1.0)
    index = SearchIndex.build(MODEL, WIDTH, [first, second, third], ann_threshold, in_place)
    second_again = partition("2026-11-02", 120, seed=22, fingerprint="f2")
    fourth = partition("2026-11-04", 90, seed=4)
    report = index.update([second_again, fourth], removed=["2026-11-03"])
    assert report.partitions_replaced == ("2026-11-02",)
    assert report.partitions_added == ("2026-11-04",)
    assert report.partitions_removed == ("2026-11-03",)
    assert (report.vectors_added, report.vectors_removed) == (210, 300)
    assert not report.ann_rebuilt  # the graph had vectors removed and added, not rebuilt
    rebuilt = SearchIndex.build(MODEL, WIDTH, [first, second_again, fourth], ann_threshold, in_place)
    assert len(index) == len(rebuilt) == 360
    assert index.fingerprints() == rebuilt.fingerprints() == {"2026-11-01": "f1", "2026-11-02": "f2", "2026-11-04": "f1"}
    queries = clustered_vectors(20, seed=7)
    assert ids_and_prefixes(index.exact_search(queries, 10)) == ids_and_prefixes(rebuilt.exact_search(queries, 10))
    if ann_threshold == 10**9:
        assert ids_and_prefixes(index.search(queries, 10)) == ids_and_prefixes(rebuilt.search(queries, 10))
    else:  # two graphs built in another order: both find (nearly) the exact answer
        assert recall_at_k(index, 10) >= 0.95 and recall_at_k(rebuilt, 10) >= 0.95
        assert [row[0] for row in ids_and_prefixes(index.search(queries, 1))] == [
            row[0] for row in ids_and_prefixes(rebuilt.search(queries, 1))
        ]


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_removing_a_partition_removes_its_ids(ann_threshold: int) -> None:
    parts = three_partitions()
    index = SearchIndex.build(MODEL, WIDTH, parts, ann_threshold=ann_threshold)
    removed_vector = index.vector_of("2026-11-02-img0005")
    index.update(removed=["2026-11-02"])
    with pytest.raises(UnknownImageId):
        index.vector_of("2026-11-02-img0005")
    found = index.search(np.concatenate([removed_vector[None, :], parts[1].vectors[:20]]), k=20)
    assert all(n.prefix != "2026-11-02" for row in found for n in row)
    assert len(index) == 300 and set(index.fingerprints()) == {"2026-11-01", "2026-11-03"}


def test_plan_update_reads_changed_and_new_partitions_and_drops_gone_ones() -> None:
    index = SearchIndex.build(MODEL, WIDTH, three_partitions())
    plan = index.plan_update({"2026-11-01": "f1", "2026-11-02": "changed", "2026-11-09": "new"})
    assert plan.to_read == ("2026-11-02", "2026-11-09")
    assert plan.to_remove == ("2026-11-03",)


def test_unknown_and_ambiguous_ids_are_refused() -> None:
    shared = PartitionVectors("2026-11-02", "f", ["2026-11-01-img0000"], clustered_vectors(1, seed=5))
    index = SearchIndex.build(MODEL, WIDTH, [partition("2026-11-01", 10, 1), shared])
    with pytest.raises(UnknownImageId, match="no-such-image"):
        index.vector_of("no-such-image")
    with pytest.raises(UnknownImageId):
        index.neighbours_of("2026-11-01-img0003", prefix="2026-11-02")
    with pytest.raises(AmbiguousImageId, match="2026-11-01.*2026-11-02"):
        index.vector_of("2026-11-01-img0000")
    assert not np.allclose(
        index.vector_of("2026-11-01-img0000", prefix="2026-11-01"), index.vector_of("2026-11-01-img0000", prefix="2026-11-02")
    )
    assert issubclass(UnknownImageId, SearchIndexError) and issubclass(AmbiguousImageId, SearchIndexError)


def test_vectors_or_queries_of_another_model_are_refused(tmp_path: Path) -> None:
    index = SearchIndex.build(MODEL, WIDTH, three_partitions())
    with pytest.raises(ModelMismatch, match="width 128"):
        index.search(np.ones((1, 2048), np.float32))
    with pytest.raises(ModelMismatch, match="clip"):
        index.search(np.ones((1, WIDTH), np.float32), model_id="clip")
    with pytest.raises(ModelMismatch):
        index.update([PartitionVectors("2026-11-05", "f", ["a"], np.ones((1, 64), np.float32))])
    assert len(index) == 450  # the refused update changed nothing
    lake = Lake(str(tmp_path / "lake"))
    save_index(index, lake)
    with pytest.raises(ModelMismatch, match="width"):
        load_index(lake, MODEL, width=2048)
    # an index folder copied under another model's name is not taken for that model's
    shutil.copytree(index_folder_uri(lake, MODEL), index_folder_uri(lake, "resnet50-v2"))
    with pytest.raises(ModelMismatch, match="resnet50"):
        load_index(lake, "resnet50-v2")


def test_bad_partitions_are_refused_whole_and_bad_vectors_skipped() -> None:
    index = SearchIndex.build(MODEL, WIDTH, three_partitions())
    with pytest.raises(InvalidPartition, match="2 image ids for 3 vectors"):
        index.update([PartitionVectors("x", "f", ["a", "b"], np.ones((3, WIDTH), np.float32))])
    with pytest.raises(InvalidPartition, match="duplicate"):
        index.update([partition("2026-11-07", 3, 1), PartitionVectors("x", "f", ["a", "a"], np.ones((2, WIDTH)))])
    assert set(index.fingerprints()) == {"2026-11-01", "2026-11-02", "2026-11-03"}
    vectors = clustered_vectors(3, seed=1)
    vectors[1] = 0.0
    vectors[2, 0] = np.nan
    report = index.update([PartitionVectors("x", "f", ["a", "b", "c"], vectors)])
    assert (report.vectors_added, report.vectors_skipped) == (1, 2)
    with pytest.raises(UnknownImageId):
        index.vector_of("b")


def test_a_missing_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IndexMissing, match="resnet50"):
        load_index(Lake(str(tmp_path / "lake")), MODEL)
    assert stored_index_bytes(Lake(str(tmp_path / "lake")), MODEL) == 0


def _assert_same_answers(loaded: SearchIndex, original: SearchIndex) -> None:
    queries = clustered_vectors(10, seed=42)
    assert loaded.fingerprints() == original.fingerprints()
    assert loaded.partition_counts() == original.partition_counts()
    assert loaded.uses_ann == original.uses_ann
    for got, expected in zip(loaded.search(queries, 10), original.search(queries, 10)):
        assert [(n.image_id, n.prefix) for n in got] == [(n.image_id, n.prefix) for n in expected]
        assert [n.similarity for n in got] == pytest.approx([n.similarity for n in expected], abs=1e-6)


def _round_trip(lake: Lake, ann_threshold: int) -> None:
    index = SearchIndex.build(MODEL, WIDTH, three_partitions(), ann_threshold=ann_threshold)
    first_save = save_index(index, lake)
    assert first_save.files_written == 3 + index.uses_ann
    _assert_same_answers(load_index(lake, MODEL, width=WIDTH), index)
    # one partition replaced: only its file (and the graph) are written again, the old ones deleted
    index.update([partition("2026-11-02", 100, seed=8, fingerprint="f2")])
    second_save = save_index(index, lake)
    assert (second_save.files_written, second_save.files_deleted) == (1 + index.uses_ann, 1 + index.uses_ann)
    loaded = load_index(lake, MODEL)
    _assert_same_answers(loaded, index)
    assert loaded.vector_of("2026-11-02-img0099").shape == (WIDTH,)
    assert stored_index_bytes(lake, MODEL) > 350 * WIDTH * 4
    # the loaded index updates and saves in turn
    loaded.update(removed=["2026-11-01"])
    assert save_index(loaded, lake).files_deleted == 1 + loaded.uses_ann
    assert set(load_index(lake, MODEL).fingerprints()) == {"2026-11-02", "2026-11-03"}


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_round_trip_on_a_local_folder(tmp_path: Path, ann_threshold: int) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _round_trip(lake, ann_threshold)
    folder = tmp_path / "lake" / "_search_index" / MODEL
    assert (folder / "manifest.json").is_file()
    named = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert len(named) == 1 + 2 + (ann_threshold == 100)  # no file left behind that the manifest does not name


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_round_trip_on_s3(bucket: str, ann_threshold: int) -> None:
    lake = Lake(f"s3://{bucket}/lake", S3Settings().delta_storage_options_provider())
    _round_trip(lake, ann_threshold)
    listed = S3Settings().client().list_objects_v2(Bucket=bucket, Prefix=f"lake/_search_index/{MODEL}/")
    # pyarrow leaves empty "folder/" marker objects behind, as it does for any folder it empties: not files
    keys = sorted(obj["Key"] for obj in listed.get("Contents", []) if not obj["Key"].endswith("/"))
    assert f"lake/_search_index/{MODEL}/manifest.json" in keys
    assert len(keys) == 1 + 2 + (ann_threshold == 100)


def test_the_graph_reaches_recall_at_10_on_clustered_vectors() -> None:
    parts = [
        PartitionVectors(f"p{n}", "f", [f"p{n}-{i}" for i in range(1000)], clustered_vectors(1000, seed=n, width=512))
        for n in range(3)
    ]
    index = SearchIndex.build(MODEL, 512, parts, ann_threshold=1000)
    assert index.uses_ann
    metadata = index_metadata(index, recall_sample=200)
    assert metadata["backend"] == "usearch-hnsw" and metadata["vectors_indexed"] == 3000
    assert metadata["recall_at_10"] >= 0.95
    assert metadata["index_bytes"] > 3000 * 512 * 4


def test_a_graph_with_too_many_tombstones_is_rebuilt() -> None:
    index = SearchIndex.build(MODEL, WIDTH, three_partitions(), ann_threshold=100)  # rebuilt past 50 % removed
    first = index.update([partition("2026-11-01", 150, seed=11, fingerprint="f2")])
    assert not first.ann_rebuilt  # 150 tombstones for 450 live vectors
    second = index.update([partition("2026-11-02", 150, seed=12, fingerprint="f2")])
    assert second.ann_rebuilt  # 300 for 450
    assert index.update([partition("2026-11-03", 150, seed=13, fingerprint="f2")]).ann_rebuilt is False
    assert recall_at_k(index, 10) >= 0.95


def test_a_small_index_drops_its_graph_and_searches_exactly() -> None:
    index = SearchIndex.build(MODEL, WIDTH, three_partitions(), ann_threshold=400)
    assert index.uses_ann
    index.update(removed=["2026-11-02", "2026-11-03"])  # 150 vectors left, below half the threshold
    assert not index.uses_ann and recall_at_k(index) == 1.0
    assert index.update([partition("2026-11-02", 300, 2)]).ann_rebuilt and index.uses_ann


def test_partition_vectors_read_from_a_delta_table_keep_to_one_model(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    vectors = clustered_vectors(4, seed=3)

    def rows(model_ids: list[str]) -> pa.Table:
        return pa.table(
            {
                "image_id": [f"img{i}" for i in range(4)],
                "prefix": ["2026-11-01"] * 4,
                "model_id": model_ids,
                "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            }
        )

    lake.write_partition("image_embeddings", rows([MODEL, "clip", MODEL, "clip"]), "2026-11-01")
    fingerprint = lake.partition_fingerprints("image_embeddings")["2026-11-01"]
    read = read_partition_models(lake, "2026-11-01", fingerprint)
    assert sorted(read) == ["clip", MODEL]
    assert list(read[MODEL].image_ids) == ["img0", "img2"] and read[MODEL].fingerprint == fingerprint
    np.testing.assert_array_equal(read[MODEL].vectors, vectors[[0, 2]])
    lake.write_partition("image_embeddings", rows([MODEL] * 4), "2026-11-01")
    again_fingerprint = lake.partition_fingerprints("image_embeddings")["2026-11-01"]
    again = read_partition_models(lake, "2026-11-01", again_fingerprint)
    assert again_fingerprint != fingerprint and sorted(again) == [MODEL] and len(again[MODEL].image_ids) == 4
    index = SearchIndex.build(MODEL, WIDTH, [read[MODEL]])
    assert index.plan_update({"2026-11-01": again_fingerprint}).to_read == ("2026-11-01",)
