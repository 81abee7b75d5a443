"""The search indexes and near_duplicates under faults, damage and concurrent refreshes (issue 23: 1-4, 8, 11).

Every test ends by checking the whole state against the embedding table: each
model's index holds exactly the table's finite vectors of that model
(normalised), and near_duplicates holds exactly the pairs an exact search of
those vectors finds. Races are forced at a seam (a patched function that runs
the other party at that point), never hoped for.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.embedding_column import embedding_array, vectors_of
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.search import refresh as index_refresh
from imgemb_assets.core.search.index import manifest as index_manifest
from imgemb_assets.core.search.index import persistence as index_persistence
from imgemb_assets.core.search.index import segments as index_segments
from imgemb_assets.core.search.index.errors import IndexCommitConflict, SearchIndexError
from imgemb_assets.core.search.index.partitions import PartitionVectors
from imgemb_assets.core.search.index.persistence import INDEX_FOLDER, index_folder_uri, load_index, save_index
from imgemb_assets.core.search.index.search_index import SearchIndex
from imgemb_assets.core.search.index.stored import stored_model_ids
from imgemb_assets.core.search.near_duplicates import DEFAULT_SIMILARITY_THRESHOLD, find_near_duplicates
from imgemb_assets.core.search.refresh import JOURNAL_NAME, IndexRefresh, refresh_search_indexes
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets_tests.core.test_near_duplicates import ExactIndex
from imgemb_support.rows import EMBEDDINGS_SCHEMA

WIDTH = 2048  # the embedding table's width (ResNet50)
MODEL_A = "torchvision/resnet50/random:1/fp32"
MODEL_B = "torchvision/resnet50/random:2/fp32"
P1, P2, P3 = "2026-11-01", "2026-11-02", "2026-11-03"
_TAGS = {MODEL_A: "a", MODEL_B: "b"}


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"))


def embed(
    lake: Lake, prefix: str, seed: int, count: int = 12, *, models: tuple[str, ...] = (MODEL_A,),
    copies: int = 2, nan_rows: tuple[int, ...] = (),
) -> None:  # fmt: skip
    """Write `prefix` of image_embeddings: `count` images per model, the last `copies` near copies of the first."""
    rng = np.random.default_rng(seed)
    pieces = []
    for model_id in models:
        vectors = rng.random((count, WIDTH), dtype=np.float32)
        for i in range(copies):
            vectors[count - 1 - i] = vectors[i] + rng.normal(0, 1e-3, WIDTH).astype(np.float32)
        for row in nan_rows:
            vectors[row, 0] = np.nan
        ids = [f"{prefix}-{_TAGS.get(model_id, 'x')}-{i:03d}" for i in range(count)]
        pieces.append(pa.table({
            "image_id": ids, tables.PARTITION_COLUMN: [prefix] * count, "etag": [f"e{i}" for i in range(count)],
            "sales": [1.0] * count, "embedding": embedding_array(vectors), "model_id": [model_id] * count,
        }, schema=EMBEDDINGS_SCHEMA))  # fmt: skip
    lake.write_partition(tables.IMAGE_EMBEDDINGS, pa.concat_tables(pieces), prefix)


def with_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexes the refresh builds from now on use a usearch graph from 10 vectors (not 50,000)."""
    monkeypatch.setattr(index_refresh, "SearchIndex", functools.partial(SearchIndex, ann_threshold=10))


def embed_and_refresh(lake: Lake, prefix: str, seed: int, **options: Any) -> None:
    """`embed`, then a refresh that indexes it."""
    embed(lake, prefix, seed, **options)
    refresh_search_indexes(lake)


def remove(lake: Lake, prefix: str) -> None:
    lake.delete_partition(tables.IMAGE_EMBEDDINGS, prefix)


def assert_in_step(lake: Lake) -> None:
    """Each model's index and near_duplicates are exactly what the embedding table's finite vectors give."""
    rows = lake.read(tables.IMAGE_EMBEDDINGS) if lake.exists(tables.IMAGE_EMBEDDINGS) else None
    by_model: dict[str, dict[str, tuple[list[str], np.ndarray]]] = {}
    if rows is not None and rows.num_rows:
        vectors = vectors_of(rows.column("embedding"))
        for row, (image_id, prefix, model_id) in enumerate(zip(
            rows.column("image_id").to_pylist(), rows.column(tables.PARTITION_COLUMN).to_pylist(),
            rows.column("model_id").to_pylist(),
        )):  # fmt: skip
            if np.isfinite(vectors[row]).all():
                ids, kept = by_model.setdefault(model_id, {}).setdefault(prefix, ([], []))  # type: ignore[arg-type]
                ids.append(image_id)
                kept.append(vectors[row])
    expected_pairs: set[tuple[str, ...]] = set()
    assert set(stored_model_ids(lake)) >= set(by_model)
    for model_id, partitions in by_model.items():
        partitions = {prefix: (ids, np.array(kept)) for prefix, (ids, kept) in partitions.items()}
        index = load_index(lake, model_id)
        assert {p: n for p, n in index.partition_counts().items() if n} == {
            p: len(ids) for p, (ids, _) in partitions.items()
        }
        exact = ExactIndex(partitions)
        for prefix, (ids, kept) in partitions.items():
            for image_id, vector in zip(ids, kept):
                np.testing.assert_allclose(
                    index.vector_of(image_id, prefix), vector / np.linalg.norm(vector), atol=1e-6
                )
            found = find_near_duplicates(ids, kept, prefix, model_id, exact.search, DEFAULT_SIMILARITY_THRESHOLD)
            expected_pairs |= _pair_keys(found.table)
    stored_pairs = _pair_keys(lake.read(tables.NEAR_DUPLICATES)) if lake.exists(tables.NEAR_DUPLICATES) else set()
    assert stored_pairs == expected_pairs


def _pair_keys(table: pa.Table) -> set[tuple[str, ...]]:
    columns = ["image_id", tables.PARTITION_COLUMN, "other_image_id", "other_prefix", "model_id"]
    return {tuple(row[c] for c in columns) for row in table.select(columns).to_pylist()}


def fail_once(target: Any, name: str, monkeypatch: pytest.MonkeyPatch, error: BaseException,
              when: Callable[..., bool] = lambda *a, **k: True) -> list[int]:  # fmt: skip
    """Patch `target.name` to raise `error` the first time `when(args)` holds; the calls made, counted."""
    real = getattr(target, name)
    calls: list[int] = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs) and not calls:
            calls.append(1)
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, patched)
    return calls


# --- items 4 and 3: a refresh that fails part-way is finished by the next one ------------------------------


@pytest.mark.parametrize("fault", ["near_duplicates write", "journal write", "kill between the two"])
def test_pairs_lost_after_the_index_save_are_written_by_the_retry(
    any_lake: Lake, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    embed_and_refresh(any_lake, P1, seed=1)
    embed(any_lake, P2, seed=2)
    if fault == "near_duplicates write":
        fail_once(Lake, "replace_partitions", monkeypatch, OSError("transient write error"))
    elif fault == "journal write":
        fail_once(index_refresh, "write_if_unchanged", monkeypatch, OSError("transient write error"))
    else:
        fail_once(index_refresh, "write_if_unchanged", monkeypatch, KeyboardInterrupt())
    with pytest.raises((OSError, KeyboardInterrupt)):
        refresh_search_indexes(any_lake)
    assert load_index(any_lake, MODEL_A).partition_counts()[P2] == 12  # the index was saved before the fault
    monkeypatch.undo()
    retry = refresh_search_indexes(any_lake)
    assert retry.partitions_read == (P2,)
    assert retry.pairs_written > 0
    assert_in_step(any_lake)
    assert refresh_search_indexes(any_lake).partitions_read == ()


def test_a_non_finite_vector_is_left_out_of_pairs_and_the_refresh_succeeds(lake: Lake) -> None:
    embed(lake, P1, seed=1, nan_rows=(4,))
    refresh = refresh_search_indexes(lake)
    assert refresh.models[MODEL_A].update.vectors_skipped == 1
    assert_in_step(lake)


def test_a_new_models_index_whose_first_save_failed_is_built_by_the_retry(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    embed_and_refresh(lake, P1, seed=1)
    embed(lake, P2, seed=2, models=(MODEL_A, MODEL_B))
    fail_once(index_refresh, "save_index", monkeypatch, OSError("transient write error"),
              when=lambda index, _lake: index.model_id == MODEL_B)  # fmt: skip
    with pytest.raises(OSError):
        refresh_search_indexes(lake)
    assert stored_model_ids(lake) == [MODEL_A]
    monkeypatch.undo()
    refresh_search_indexes(lake)
    assert load_index(lake, MODEL_B).partition_counts() == {P1: 0, P2: 12}
    assert_in_step(lake)


def test_a_deleted_index_folder_is_rebuilt_while_another_models_exists(any_lake: Lake) -> None:
    embed(any_lake, P1, seed=1)
    embed_and_refresh(any_lake, P2, seed=2, models=(MODEL_B,))
    _delete_folder(any_lake, index_folder_uri(any_lake, MODEL_B))
    refresh = refresh_search_indexes(any_lake)
    assert set(refresh.rebuilt) == {MODEL_B} and "holds no index any more" in refresh.rebuilt[MODEL_B]
    assert_in_step(any_lake)
    assert refresh_search_indexes(any_lake).partitions_read == ()


# --- item 2: damage is named, and repaired by the next refresh ---------------------------------------------


def _damage(lake: Lake, model_id: str, how: str) -> str:
    """Damage the model's stored index in one way; the file damaged, relative to the index folder."""
    folder = Path(index_folder_uri(lake, model_id))
    segment = sorted((folder / "segments").iterdir())[0]
    graph = sorted((folder / "ann").iterdir())[0] if (folder / "ann").exists() else None
    if how == "segment missing":
        segment.unlink()
    elif how == "segment truncated":
        segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
    elif how == "segment empty":
        segment.write_bytes(b"")
    elif how == "manifest not an object":
        (folder / "manifest.json").write_text("[]")
        return "manifest.json"
    elif how == "manifest without partitions":
        (folder / "manifest.json").write_text('{"format_version": 2, "model_id": "x"}')
        return "manifest.json"
    elif how == "graph garbage":
        assert graph is not None
        graph.write_bytes(b"not a graph" * 20)
        return f"ann/{graph.name}"
    return f"segments/{segment.name}"


DAMAGE = ["segment missing", "segment truncated", "segment empty", "manifest not an object",
          "manifest without partitions", "graph garbage"]  # fmt: skip


@pytest.mark.parametrize("how", DAMAGE)
def test_damage_is_one_error_naming_the_file_and_the_next_refresh_rebuilds_the_index(
    lake: Lake, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_graphs(monkeypatch)  # a graph file to damage
    embed(lake, P1, seed=1)
    embed_and_refresh(lake, P2, seed=2)
    damaged = _damage(lake, MODEL_A, how)
    with pytest.raises(SearchIndexError, match=damaged.replace(".", r"\.")):
        load_index(lake, MODEL_A)
    refresh = refresh_search_indexes(lake)
    assert list(refresh.rebuilt) == [MODEL_A] and damaged in refresh.rebuilt[MODEL_A]
    assert_in_step(lake)
    again = refresh_search_indexes(lake)
    assert again.partitions_read == () and again.rebuilt == {}


def test_a_damaged_folder_no_model_claims_is_set_aside_once(lake: Lake) -> None:
    embed_and_refresh(lake, P1, seed=1)
    stray = Path(index_folder_uri(lake, "gone-model"))
    stray.mkdir(parents=True)
    (stray / "manifest.json").write_text("{not json")
    refresh = refresh_search_indexes(lake)
    assert "renamed" in refresh.rebuilt[str(stray)]
    assert not (stray / "manifest.json").exists()
    assert refresh_search_indexes(lake).partitions_read == ()
    assert_in_step(lake)


# --- item 1: concurrent refreshes ------------------------------------------------------------------------


def _run_before_first(target: Any, name: str, monkeypatch: pytest.MonkeyPatch, other: Callable[[], None]) -> None:
    """Patch `target.name` so that its first call first runs `other` to completion (the forced interleaving)."""
    real = getattr(target, name)
    ran: list[int] = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        if not ran:
            ran.append(1)
            other()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, patched)


def _refresh_that_loses_a_race(
    lake: Lake, monkeypatch: pytest.MonkeyPatch, step: str, change: Callable[[], None]
) -> IndexRefresh:
    """A refresh of P2 during which another one, just before the first's first call of `index_refresh.<step>`,
    makes `change` and commits its own refresh."""
    embed_and_refresh(lake, P1, seed=1)
    embed(lake, P2, seed=2)
    real_step = getattr(index_refresh, step)

    def other_refresh_after_a_change() -> None:
        change()
        with monkeypatch.context() as inner:
            inner.setattr(index_refresh, step, real_step)
            refresh_search_indexes(lake)

    _run_before_first(index_refresh, step, monkeypatch, other_refresh_after_a_change)
    monkeypatch.setattr(index_refresh.time, "sleep", lambda seconds: None)
    return refresh_search_indexes(lake)


def test_a_refresh_that_loses_the_index_race_starts_over_from_the_winners_commit(
    any_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first refresh has loaded the index and updated it in memory when the other one commits.
    refresh = _refresh_that_loses_a_race(any_lake, monkeypatch, "save_index", lambda: embed(any_lake, P3, seed=3))
    assert refresh.attempts == 2
    assert_in_step(any_lake)


def test_a_refresh_whose_journal_lost_the_race_writes_its_pairs_again(
    lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # P2 rewritten and committed by another refresh after the first one found P2's pairs: those pairs, written
    # next, are stale
    refresh = _refresh_that_loses_a_race(lake, monkeypatch, "write_near_duplicates", lambda: embed(lake, P2, seed=22))
    assert refresh.attempts == 2 and P2 in refresh.partitions_read
    assert_in_step(lake)


def test_two_saves_from_one_load_commit_once_and_the_index_stays_readable(
    any_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    embed(any_lake, P1, seed=1)
    embed_and_refresh(any_lake, P2, seed=2)
    first, second = load_index(any_lake, MODEL_A), load_index(any_lake, MODEL_A)
    monkeypatch.setattr(index_segments, "_MAX_SEGMENTS", 1)  # the second save compacts: the old segment is retired
    vectors = np.random.default_rng(3).random((5, WIDTH), dtype=np.float32)
    second.update([PartitionVectors(P3, "f3", [f"n{i}" for i in range(5)], vectors)], removed=[P1])
    save_index(second, any_lake)
    first.update(removed=[P2])
    with pytest.raises(IndexCommitConflict, match="another writer"):
        save_index(first, any_lake)
    assert load_index(any_lake, MODEL_A).partition_counts() == {P2: 12, P3: 5}


# --- items 8 and 11: readers keep their files for the grace; orphans go after it -----------------------------


def test_a_load_that_read_the_old_manifest_finds_its_files_after_a_save_replaced_them(
    any_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_graphs(monkeypatch)
    embed(any_lake, P1, seed=1)
    embed_and_refresh(any_lake, P2, seed=2)

    def a_writer_replaces_the_graph() -> None:
        writer = load_index(any_lake, MODEL_A)
        writer.update(removed=[P1])
        writer._ann.file = None  # type: ignore[union-attr]  # a rebuilt graph: a new file, the old one retired
        save_index(writer, any_lake)

    _run_before_first(index_persistence, "_read_graph_file", monkeypatch, a_writer_replaces_the_graph)
    reader = load_index(any_lake, MODEL_A)  # read the old manifest, then its graph after the save
    assert set(reader.partition_counts()) == {P1, P2}


def test_retired_files_stay_for_the_grace_then_go(lake: Lake, monkeypatch: pytest.MonkeyPatch) -> None:
    embed_and_refresh(lake, P1, seed=1)
    folder = Path(index_folder_uri(lake, MODEL_A))
    (old_segment,) = (folder / "segments").iterdir()
    embed_and_refresh(lake, P1, seed=11)
    assert old_segment.exists()  # retired, not deleted: a reader of the old manifest may still read it
    monkeypatch.setattr(index_manifest, "RETIRED_GRACE_S", 0.0)
    embed_and_refresh(lake, P2, seed=2)
    assert not old_segment.exists()
    assert_in_step(lake)


def test_the_orphan_of_a_killed_save_is_deleted_after_the_grace(
    any_lake: Lake, monkeypatch: pytest.MonkeyPatch
) -> None:
    embed_and_refresh(any_lake, P1, seed=1)
    # What a save killed between its segment and its manifest leaves: a file nothing names.
    orphan = "segments/0123456789abcdef0123456789abcdef.parquet"
    folder = index_persistence._index_folder(any_lake, MODEL_A)
    with folder.filesystem.open_output_stream(folder.file(orphan)) as stream:
        stream.write(b"PAR1 half a segment")
    embed_and_refresh(any_lake, P2, seed=2)
    assert _exists(folder, orphan)  # younger than the grace: maybe a save still under way
    monkeypatch.setattr(index_manifest, "RETIRED_GRACE_S", 0.0)
    embed_and_refresh(any_lake, P3, seed=3)
    assert not _exists(folder, orphan)
    assert_in_step(any_lake)


def _exists(folder: Any, name: str) -> bool:
    import pyarrow.fs as pafs

    return folder.filesystem.get_file_info(folder.file(name)).type == pafs.FileType.File


def _delete_folder(lake: Lake, uri: str) -> None:
    if uri.startswith("s3://"):
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        client = S3Settings().client()
        for item in client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/").get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    else:
        shutil.rmtree(uri)


def test_the_journal_is_written_last_and_names_the_fingerprints_it_committed(lake: Lake) -> None:
    embed_and_refresh(lake, P1, seed=1)
    journal = Path(lake.root_uri) / INDEX_FOLDER / JOURNAL_NAME
    assert journal.exists() and P1 in journal.read_text()


# --- random interleavings: whatever happened, the next refresh leaves everything in step -------------------------

_SEAMS = {
    # where a refresh is killed, or where another refresh runs to completion before it goes on
    "index save": (index_refresh, "save_index"),
    "near_duplicates write": (index_refresh, "write_near_duplicates"),
    "journal write": (index_refresh, "write_if_unchanged"),
}
_PREFIXES = ("2026-12-01", "2026-12-02", "2026-12-03")
_operations = st.one_of(
    st.tuples(st.just("embed"), st.sampled_from(_PREFIXES), st.integers(0, 10**6),
              st.sampled_from([(MODEL_A,), (MODEL_B,), (MODEL_A, MODEL_B)]), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(_PREFIXES)),
    st.tuples(st.just("refresh")),
    st.tuples(st.just("killed"), st.sampled_from(sorted(_SEAMS))),
    st.tuples(st.just("overtaken"), st.sampled_from(sorted(_SEAMS)), st.sampled_from(_PREFIXES), st.integers(0, 10**6)),
)  # fmt: skip


@settings(
    max_examples=int(os.environ.get("IMGEMB_PROPERTY_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(operations=st.lists(_operations, min_size=1, max_size=7))
def test_random_interleavings_of_refreshes_removals_reembeds_and_kills_end_in_step(operations: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as root, pytest.MonkeyPatch.context() as patch:
        patch.setattr(index_refresh.time, "sleep", lambda seconds: None)
        lake = Lake(f"{root}/lake")
        for operation in operations:
            _apply(lake, operation, patch)
            if operation[0] == "refresh":
                assert_in_step(lake)
        refresh_search_indexes(lake)
        assert_in_step(lake)


def _apply(lake: Lake, operation: tuple, patch: pytest.MonkeyPatch) -> None:
    kind = operation[0]
    if kind == "embed":
        _, prefix, seed, models, with_nan = operation
        embed(lake, prefix, seed, count=6, models=models, nan_rows=(3,) if with_nan else ())
    elif kind == "remove":
        if lake.exists(tables.IMAGE_EMBEDDINGS):
            remove(lake, operation[1])
    elif kind == "refresh":
        refresh_search_indexes(lake)
    elif kind == "killed":
        target, name = _SEAMS[operation[1]]
        with patch.context() as inner:
            fail_once(target, name, inner, KeyboardInterrupt())
            try:
                refresh_search_indexes(lake)
            except KeyboardInterrupt:
                pass
    else:  # overtaken: another refresh, after another embed, commits while this one is at the seam
        _, seam, prefix, seed = operation
        target, name = _SEAMS[seam]
        real = getattr(target, name)

        def other() -> None:
            embed(lake, prefix, seed, count=6)
            with patch.context() as inner:
                inner.setattr(target, name, real)
                refresh_search_indexes(lake)

        with patch.context() as inner:
            _run_before_first(target, name, inner, other)
            refresh_search_indexes(lake)
