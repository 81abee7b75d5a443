"""The similar-image search index: queries, incremental updates, typed refusals, and persistence on a local
folder and on a real S3 API (the moto server subprocess), with real usearch graphs and real parquet files:
segments, compaction, partitions with no vectors, and the files a save writes and a load opens (counted
through a pyarrow filesystem wrapped around the real one)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search.index import manifest as index_manifest
from imgemb_assets.core.search.index import persistence as index_persistence
from imgemb_assets.core.search.index.errors import (
    AmbiguousImageId,
    IndexMissing,
    InvalidPartition,
    ModelMismatch,
    SearchIndexError,
    UnknownImageId,
)
from imgemb_assets.core.search.index.graph import AnnParameters
from imgemb_assets.core.search.index.metrics import index_metadata, recall_at_k
from imgemb_assets.core.search.index.partitions import PartitionVectors, read_partition_models
from imgemb_assets.core.search.index.persistence import index_folder_uri, load_index, save_index, stored_index_bytes
from imgemb_assets.core.search.index.search_index import SearchIndex
from imgemb_assets.core.search.index.stored import stored_model_ids
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_support.counting_filesystem import CountingHandler

WIDTH = 128
MODEL = "resnet50"


def clustered_vectors(count: int, seed: int, clusters: int = 20, width: int = WIDTH) -> np.ndarray:
    """Non-negative vectors around a few centres, like pooled CNN features of similar products."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((clusters, width))) * (rng.random((clusters, width)) < 0.3)
    points = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, width))
    return np.abs(points).astype(np.float32)


def partition(prefix: str, count: int, seed: int, fingerprint: str = "f1") -> PartitionVectors:
    return PartitionVectors(
        prefix, fingerprint, [f"{prefix}-img{i:04d}" for i in range(count)], clustered_vectors(count, seed)
    )


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
    everything = np.concatenate([p.vectors for p in parts]).astype(np.float64)
    entries = [(i, p.prefix) for p in parts for i in p.image_ids]
    column_of = {entry: column for column, entry in enumerate(entries)}
    # every indexed vector asks (each partition's first and last rows among them), then a few new vectors
    queries = np.concatenate([everything, clustered_vectors(5, seed=99)])
    normalised = everything / np.linalg.norm(everything, axis=1, keepdims=True)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ normalised.T
    found = index.search(queries, k=len(entries) + 1)  # more than it holds: the full ranking
    assert len(found) == len(queries)
    for row, neighbours in enumerate(found):
        ranked = [(n.image_id, n.prefix) for n in neighbours]
        assert sorted(ranked) == sorted(entries)  # every indexed vector ranked, each once
        similarities = np.array([n.similarity for n in neighbours])
        reference = np.argsort(-scores[row], kind="stable")
        # rank by rank the reference's similarities, and each its own vector's: the ranking, up to float ties
        np.testing.assert_allclose(similarities, scores[row][reference], atol=1e-5)
        np.testing.assert_allclose(similarities, scores[row][[column_of[e] for e in ranked]], atol=1e-5)
        if row < len(entries):  # an indexed vector finds itself first
            assert ranked[0] == entries[row]
        else:
            assert ranked[:10] == [entries[i] for i in reference[:10]]


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_an_incremental_update_equals_a_full_rebuild(ann_threshold: int) -> None:
    first, second, third = three_partitions()
    # tombstones up to the live count allowed, so the graph is updated in place, not rebuilt;
    # one inserting thread, so each graph does not depend on thread timing (on a busy machine
    # the top hit of one query differed between runs)
    in_place = AnnParameters(rebuild_after_removed_fraction=1.0, insert_threads=1)
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
    assert (
        index.fingerprints() == rebuilt.fingerprints() == {"2026-11-01": "f1", "2026-11-02": "f2", "2026-11-04": "f1"}
    )
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
        index.vector_of("2026-11-01-img0000", prefix="2026-11-01"),
        index.vector_of("2026-11-01-img0000", prefix="2026-11-02"),
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
    assert first_save.files_written == 1 + index.uses_ann  # one segment holds the three partitions
    _assert_same_answers(load_index(lake, MODEL, width=WIDTH), index)
    # one partition replaced: only its rows (and the graph) are written again, in a new segment; the
    # first segment still holds the other two partitions' rows and stays (300 of its 450 rows live)
    index.update([partition("2026-11-02", 100, seed=8, fingerprint="f2")])
    second_save = save_index(index, lake)
    assert (second_save.files_written, second_save.files_deleted) == (1 + index.uses_ann, 0 + index.uses_ann)
    loaded = load_index(lake, MODEL)
    _assert_same_answers(loaded, index)
    assert loaded.vector_of("2026-11-02-img0099").shape == (WIDTH,)
    assert stored_index_bytes(lake, MODEL) > 350 * WIDTH * 4
    # the loaded index updates and saves in turn
    # 250 of the two segments' 550 rows live: compacted into one new segment, both old ones deleted
    loaded.update(removed=["2026-11-01"])
    assert save_index(loaded, lake).files_deleted == 2 + loaded.uses_ann
    assert set(load_index(lake, MODEL).fingerprints()) == {"2026-11-02", "2026-11-03"}


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_round_trip_on_a_local_folder(tmp_path: Path, ann_threshold: int) -> None:
    lake = Lake(str(tmp_path / "lake"))
    _round_trip(lake, ann_threshold)
    folder = tmp_path / "lake" / "_search_index" / MODEL
    assert (folder / "manifest.json").is_file()
    assert len(stored_files(lake)) == 1 + 1 + (
        ann_threshold == 100
    )  # no file left behind that the manifest does not name


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_round_trip_on_s3(bucket: str, ann_threshold: int) -> None:
    lake = Lake(f"s3://{bucket}/lake", S3Settings().delta_storage_options_provider())
    _round_trip(lake, ann_threshold)
    listed = S3Settings().client().list_objects_v2(Bucket=bucket, Prefix=f"lake/_search_index/{MODEL}/")
    # pyarrow leaves empty "folder/" marker objects behind, as it does for any folder it empties: not files
    keys = sorted(obj["Key"] for obj in listed.get("Contents", []) if not obj["Key"].endswith("/"))
    assert f"lake/_search_index/{MODEL}/manifest.json" in keys
    assert len(keys) == 1 + 1 + (ann_threshold == 100)


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


# --- segments: files written and opened, partitions with no vectors, compaction ---------


@contextmanager
def files_opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The files the index's persistence opens for reading meanwhile, through its real filesystem."""
    original = index_persistence._index_folder
    opened: list[str] = []

    def counting_folder(lake: Lake, model_id: str) -> Any:
        folder = original(lake, model_id)
        handler = CountingHandler(folder.filesystem)
        handler.read = opened
        return type(folder)(pafs.PyFileSystem(handler), folder.path, folder.is_local, folder.storage_options)

    read_versioned = index_persistence.read_versioned

    def counting_read_versioned(location: Any, name: str) -> Any:
        # the manifest is read with its version, outside the pyarrow filesystem
        opened.append(location.file(name))
        return read_versioned(location, name)

    with monkeypatch.context() as patch:
        patch.setattr(index_persistence, "_index_folder", counting_folder)
        patch.setattr(index_persistence, "read_versioned", counting_read_versioned)
        yield opened


def small_partitions(
    count: int, per_partition: int = 2, fingerprint: str = "f1", seed: int = 0
) -> list[PartitionVectors]:
    vectors = clustered_vectors(count * per_partition, seed)
    return [
        PartitionVectors(
            f"p{n:04d}",
            fingerprint,
            [f"p{n:04d}-{i}" for i in range(per_partition)],
            vectors[n * per_partition : (n + 1) * per_partition],
        )
        for n in range(count)
    ]


@pytest.fixture(autouse=True)
def files_retired_are_deleted_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests count the files a save leaves without the readers' grace; test_index_refresh.py tests the grace."""
    monkeypatch.setattr(index_manifest, "RETIRED_GRACE_S", 0.0)


def stored_files(lake: Lake, model_id: str = MODEL) -> set[str]:
    """The files under the model's index folder, relative to it (S3's empty "folder/" markers are not files)."""
    uri = index_folder_uri(lake, model_id)
    if lake.root_uri.startswith("s3://"):
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        listed = S3Settings().client().list_objects_v2(Bucket=bucket, Prefix=f"{key}/")
        return {
            obj["Key"].removeprefix(f"{key}/") for obj in listed.get("Contents", []) if not obj["Key"].endswith("/")
        }
    folder = Path(uri)
    # not the local writers' lock file (`.manifest.json.lock`): an empty file that only flock uses
    files = {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not path.name.endswith(".lock")
    }
    return files if folder.exists() else set()


def segment_files(lake: Lake, model_id: str = MODEL) -> set[str]:
    return {name for name in stored_files(lake, model_id) if name.startswith("segments/")}


def _assert_same_vectors(loaded: SearchIndex, original: SearchIndex) -> None:
    for prefix, count in original.partition_counts().items():
        for i in range(0, count, max(1, count // 3)):
            image_id = f"{prefix}-{i}"
            np.testing.assert_array_equal(loaded.vector_of(image_id, prefix), original.vector_of(image_id, prefix))


def test_a_save_after_3_of_1000_partitions_changed_writes_one_segment(any_lake: Lake) -> None:
    index = SearchIndex.build(MODEL, WIDTH, small_partitions(1000))
    first = save_index(index, any_lake)
    assert first.files_written == 1 and first.files_deleted == 0
    before = stored_files(any_lake)
    assert len(before) == 2 and "manifest.json" in before  # 2,000 vectors of 1,000 partitions: one segment
    loaded = load_index(any_lake, MODEL)
    changed = small_partitions(1000, fingerprint="f2", seed=5)[100:103]
    loaded.update(changed)
    report = save_index(loaded, any_lake)
    assert (report.files_written, report.files_deleted) == (1, 0)
    after = stored_files(any_lake)
    assert len(after - before) == 1 and before <= after  # one new segment; the first still holds 997 partitions
    # the new segment holds the three changed partitions' rows only: about 3/1000 of the first one's bytes
    assert report.bytes_written < first.bytes_written / 50
    again = load_index(any_lake, MODEL)
    assert again.fingerprints() == loaded.fingerprints()
    assert [again.fingerprints()[p.prefix] for p in changed] == ["f2"] * 3
    _assert_same_answers(again, loaded)
    _assert_same_vectors(again, loaded)


def test_a_load_opens_the_same_few_files_whatever_the_partition_count(
    any_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened_by_count = {}
    for count in (10, 1000):
        model_id = f"{MODEL}-{count}"
        save_index(SearchIndex.build(model_id, WIDTH, small_partitions(count), ann_threshold=10), any_lake)
        with files_opened(monkeypatch) as opened:
            assert len(load_index(any_lake, model_id)) == 2 * count
        opened_by_count[count] = opened
    # the manifest, the one segment, the graph: for 10 partitions and for 1,000
    assert len(opened_by_count[10]) == len(opened_by_count[1000]) == 3
    assert len(set(opened_by_count[1000])) == 3


def test_more_than_32_segments_are_compacted_into_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = Lake(str(tmp_path / "lake"))
    index = SearchIndex.build(MODEL, WIDTH, small_partitions(1000))
    save_index(index, lake)
    replacements = small_partitions(1000, fingerprint="f2", seed=9)
    for save in range(1, 33):
        # one partition changed per save: every segment stays mostly live, only their number grows
        index.update([replacements[save]])
        report = save_index(index, lake)
        segments = len(stored_files(lake)) - 1
        if save < 32:
            assert (report.files_written, report.files_deleted, segments) == (1, 0, save + 1)
        else:  # a 33rd segment would be one too many: every live row goes into one new segment
            assert (report.files_written, report.files_deleted, segments) == (1, 32, 1)
    with files_opened(monkeypatch) as opened:
        loaded = load_index(lake, MODEL)
    assert len(opened) == 2
    _assert_same_answers(loaded, index)
    _assert_same_vectors(loaded, index)


@pytest.mark.parametrize("ann_threshold", [10**9, 100], ids=["exact", "hnsw"])
def test_mostly_dead_segments_are_compacted_and_answers_survive_the_round_trip(
    any_lake: Lake, ann_threshold: int
) -> None:
    def replaced(first: int, last: int, fingerprint: str, seed: int) -> list[PartitionVectors]:
        return small_partitions(40, per_partition=5, fingerprint=fingerprint, seed=seed)[first:last]

    index = SearchIndex.build(MODEL, WIDTH, small_partitions(40, per_partition=5), ann_threshold=ann_threshold)
    save_index(index, any_lake)  # segment A: 200 rows
    segments: list[set[str]] = [segment_files(any_lake)]
    # 200 rows live throughout; the saves below add segments B (95 rows), C (75), D (35)
    for changed, live_of_total in ((replaced(0, 19, "f2", 3), "200/295"), (replaced(0, 15, "f3", 4), "200/370")):
        index.update(changed)
        report = save_index(index, any_lake)
        # at least half the named rows live: a new segment, no other file deleted (the graph is replaced)
        assert (report.files_written, report.files_deleted) == (1 + index.uses_ann, index.uses_ann), live_of_total
        segments.append(segment_files(any_lake))
    assert segments[0] < segments[1] < segments[2] and len(segments[2]) == 3
    before_compaction = {
        "search": index.search(clustered_vectors(10, seed=42), 10),
        "fingerprints": index.fingerprints(),
    }
    index.update(replaced(19, 26, "f4", 5), removed=["p0039"])  # 195 live of 405: under half
    report = save_index(index, any_lake)
    assert (report.files_written, report.files_deleted) == (1 + index.uses_ann, 3 + index.uses_ann)
    assert len(stored_files(any_lake)) == 2 + index.uses_ann
    assert len(segment_files(any_lake)) == 1 and not segments[2] & segment_files(any_lake)
    loaded = load_index(any_lake, MODEL)
    assert loaded.fingerprints() == index.fingerprints() != before_compaction["fingerprints"]
    assert set(loaded.fingerprints().values()) == {"f1", "f2", "f3", "f4"} and "p0039" not in loaded.fingerprints()
    assert loaded.partition_counts() == {f"p{n:04d}": 5 for n in range(39)}
    _assert_same_answers(loaded, index)
    _assert_same_vectors(loaded, index)
    assert loaded.plan_update(index.fingerprints()).to_read == ()


def put_file(lake: Lake, relative: str, body: bytes) -> None:
    """A file under the lake's index root, written with the storage's own client."""
    if lake.root_uri.startswith("s3://"):
        bucket, key = lake.root_uri.removeprefix("s3://").split("/", 1)
        S3Settings().client().put_object(Bucket=bucket, Key=f"{key}/_search_index/{relative}", Body=body)
        return
    path = Path(lake.root_uri) / "_search_index" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)


def test_partitions_with_no_vectors_cost_no_file_and_keep_their_fingerprint(any_lake: Lake) -> None:
    empties = [
        PartitionVectors("2026-11-05", "e1", [], np.empty((0, WIDTH), np.float32)),
        PartitionVectors("2026-11-06", "e2", [], np.empty(0)),  # any empty shape will do
        PartitionVectors(
            "2026-11-07", "e3", ["a", "b"], np.zeros((2, WIDTH), np.float32)
        ),  # no vector with a direction
    ]
    only_empty = SearchIndex.build(MODEL, WIDTH, empties)
    report = save_index(only_empty, any_lake)
    assert (report.files_written, report.files_deleted) == (0, 0)
    assert stored_files(any_lake) == {"manifest.json"}
    loaded = load_index(any_lake, MODEL)
    fingerprints = {"2026-11-05": "e1", "2026-11-06": "e2", "2026-11-07": "e3"}
    assert loaded.fingerprints() == fingerprints and set(loaded.partition_counts().values()) == {0}
    assert len(loaded) == 0 and loaded.search(clustered_vectors(1, seed=1), 5) == [[]]
    assert loaded.plan_update(fingerprints).to_read == ()  # looked at already: nothing to read again
    # beside partitions with vectors: one segment for those, still no file for the empty ones
    loaded.update([*three_partitions(), PartitionVectors("2026-11-05", "e1b", [], np.empty((0, WIDTH)))])
    assert save_index(loaded, any_lake).files_written == 1
    assert len(segment_files(any_lake)) == 1
    again = load_index(any_lake, MODEL)
    assert again.fingerprints() == {
        **fingerprints,
        "2026-11-05": "e1b",
        "2026-11-01": "f1",
        "2026-11-02": "f1",
        "2026-11-03": "f1",
    }
    assert again.partition_counts()["2026-11-05"] == 0 and again.partition_counts()["2026-11-01"] == 150
    _assert_same_answers(again, loaded)
    # a partition that loses its vectors: no new file (300 of the segment's 450 rows still live)
    again.update([PartitionVectors("2026-11-01", "emptied", [], np.empty((0, WIDTH)))])
    assert save_index(again, any_lake).files_written == 0
    final = load_index(any_lake, MODEL)
    assert final.fingerprints()["2026-11-01"] == "emptied" and final.partition_counts()["2026-11-01"] == 0
    with pytest.raises(UnknownImageId):
        final.vector_of("2026-11-01-img0000")
    _assert_same_answers(final, again)


def test_stored_model_ids_reads_the_manifests(any_lake: Lake) -> None:
    assert stored_model_ids(any_lake) == []
    odd = "openai/clip-vit-base-patch32 @ rev:7"
    for model_id in (MODEL, odd):
        save_index(SearchIndex.build(model_id, WIDTH, [partition("2026-11-01", 5, 1)]), any_lake)
    assert index_folder_uri(any_lake, odd).rsplit("/", 1)[1] != odd  # the folder name would not give it back
    # a folder whose first save never got to its manifest holds no index
    put_file(any_lake, "half-written/segments/0123.parquet", b"not yet")
    assert stored_model_ids(any_lake) == sorted([MODEL, odd])
    # an index with nothing in it is an index still
    save_index(
        SearchIndex.build("empty-model", WIDTH, [PartitionVectors("p", "f", [], np.empty((0, WIDTH)))]), any_lake
    )
    assert stored_model_ids(any_lake) == sorted([MODEL, odd, "empty-model"])


def test_an_index_of_the_old_format_is_refused_and_a_rebuild_replaces_its_files(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    # what format 1 wrote: one parquet file per partition, listed in the manifest
    old_manifest = {
        "format_version": 1,
        "model_id": MODEL,
        "width": WIDTH,
        "ann": {"file": None},
        "partitions": [{"prefix": "2026-11-01", "fingerprint": "f1", "count": 5, "file": "partitions/old.parquet"}],
    }
    put_file(lake, f"{MODEL}/manifest.json", json.dumps(old_manifest).encode())
    put_file(lake, f"{MODEL}/partitions/old.parquet", b"format 1 rows")
    assert stored_model_ids(lake) == [MODEL]
    with pytest.raises(SearchIndexError, match="format 1.*build it again") as refused:
        load_index(lake, MODEL)
    assert not isinstance(refused.value, IndexMissing)
    assert stored_index_bytes(lake, MODEL) > len(b"format 1 rows")
    rebuilt = SearchIndex.build(MODEL, WIDTH, three_partitions())
    assert save_index(rebuilt, lake).files_deleted == 1
    assert stored_files(lake) == {"manifest.json", *segment_files(lake)} and len(segment_files(lake)) == 1
    _assert_same_answers(load_index(lake, MODEL), rebuilt)


def test_an_index_loaded_from_one_lake_saves_whole_to_another(tmp_path: Path) -> None:
    first, second = Lake(str(tmp_path / "first")), Lake(str(tmp_path / "second"))
    save_index(SearchIndex.build(MODEL, WIDTH, three_partitions(), ann_threshold=100), first)
    loaded = load_index(first, MODEL)
    # its segments and graph are in the first lake: the second gets its own, not a manifest naming missing files
    assert save_index(loaded, second).files_written == 2
    _assert_same_answers(load_index(second, MODEL), loaded)
    assert save_index(loaded, second).files_written == 0  # and from then on it is stored there
    assert len(stored_files(first)) == len(stored_files(second)) == 3
