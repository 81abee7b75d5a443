"""Near-duplicate pairs against an exact numpy search, and the jump decision on their share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from imgemb_assets.core.lake.tables import NEAR_DUPLICATES_SCHEMA
from imgemb_assets.core.search.near_duplicates import (
    NearDuplicates,
    ShareJumpRule,
    find_near_duplicates,
    near_duplicate_share_check,
    share_jumped,
)

WIDTH = 256
MODEL = "resnet50-test"
FIRST, SECOND = "2026-11-01", "2026-11-02"


@dataclass(frozen=True)
class Hit:
    image_id: str
    prefix: str
    similarity: float


class ExactIndex:
    """Every partition's vectors; search ranks them all by cosine, as a flat index would."""

    def __init__(self, partitions: dict[str, tuple[list[str], np.ndarray]]) -> None:
        self.keys = [(prefix, image_id) for prefix, (ids, _) in partitions.items() for image_id in ids]
        vectors = np.vstack([vectors for _, vectors in partitions.values()]).astype(np.float64)
        self.unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        similarities = unit @ self.unit.T
        best = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
        return [
            [Hit(self.keys[j][1], self.keys[j][0], float(row[j])) for j in order]
            for row, order in zip(similarities, best)
        ]


def _photos(rng: np.random.Generator, count: int, tag: str) -> tuple[list[str], np.ndarray]:
    # Non-negative like ResNet50's pooled features: unrelated vectors sit near cosine 0.64.
    return [f"{tag}_{n:03d}" for n in range(count)], np.abs(rng.normal(size=(count, WIDTH)))


def _at_cosine(rng: np.random.Generator, vector: np.ndarray, cosine: float) -> np.ndarray:
    """A vector at exactly `cosine` to `vector`."""
    unit = vector / np.linalg.norm(vector)
    other = rng.normal(size=vector.shape)
    other -= (other @ unit) * unit
    return cosine * unit + np.sqrt(1 - cosine**2) * other / np.linalg.norm(other)


def _run(partitions: dict[str, tuple[list[str], np.ndarray]], prefix: str, **kwargs: object) -> NearDuplicates:
    ids, vectors = partitions[prefix]
    return find_near_duplicates(ids, vectors, prefix, MODEL, ExactIndex(partitions).search, **kwargs)  # type: ignore[arg-type]


def test_a_pair_across_partitions_is_found_once_from_each_side() -> None:
    rng = np.random.default_rng(0)
    first, second = _photos(rng, 60, "a"), _photos(rng, 60, "b")
    second[1][7] = first[1][3] + rng.normal(scale=0.01, size=WIDTH)  # a re-encoded copy
    partitions = {FIRST: first, SECOND: second}

    found = _run(partitions, SECOND)
    assert found.table.schema.equals(NEAR_DUPLICATES_SCHEMA)
    assert found.table.drop_columns(["similarity"]).to_pylist() == [
        {
            "image_id": "b_007",
            "prefix": SECOND,
            "other_image_id": "a_003",
            "other_prefix": FIRST,
            "same_partition": False,
            "model_id": MODEL,
        }
    ]
    assert found.table.column("similarity")[0].as_py() > 0.99
    assert (found.images, found.images_with_near_duplicate, found.self_matches_missing) == (60, 1, 0)
    # The earlier partition, searched against the same index, records the pair with its own image first.
    mirrored = _run(partitions, FIRST).table.to_pylist()
    assert [(row["image_id"], row["other_image_id"], row["other_prefix"]) for row in mirrored] == [
        ("a_003", "b_007", SECOND)
    ]


def test_a_pair_inside_the_partition_is_one_row_and_counts_both_images() -> None:
    rng = np.random.default_rng(1)
    ids, vectors = _photos(rng, 50, "b")
    vectors[40] = vectors[12] * 1.5  # same direction, other scale: cosine 1
    found = _run({FIRST: _photos(rng, 50, "a"), SECOND: (ids, vectors)}, SECOND)
    rows = found.table.to_pylist()
    assert [(row["image_id"], row["other_image_id"], row["same_partition"]) for row in rows] == [
        ("b_012", "b_040", True)
    ]
    assert found.images_with_near_duplicate == 2
    assert found.share_with_near_duplicate == pytest.approx(2 / 50)


def test_the_threshold_is_respected() -> None:
    rng = np.random.default_rng(2)
    ids, vectors = _photos(rng, 40, "b")
    vectors[20] = _at_cosine(rng, vectors[0], 0.96)
    vectors[21] = _at_cosine(rng, vectors[1], 0.94)
    partitions = {SECOND: (ids, vectors)}

    def pairs(threshold: float) -> set[tuple[str, str]]:
        table = _run(partitions, SECOND, threshold=threshold).table
        assert min(table.column("similarity").to_pylist(), default=1.0) >= threshold
        return set(zip(table.column("image_id").to_pylist(), table.column("other_image_id").to_pylist()))

    assert pairs(0.95) == {("b_000", "b_020")}
    assert pairs(0.93) == {("b_000", "b_020"), ("b_001", "b_021")}
    assert pairs(0.97) == set()


def test_the_same_image_id_in_another_partition_is_a_pair_not_the_image_itself() -> None:
    rng = np.random.default_rng(3)
    ids, vectors = _photos(rng, 30, "x")
    partitions = {FIRST: (ids, vectors), SECOND: (ids, vectors.copy())}  # re-uploaded under the same names
    found = _run(partitions, SECOND)
    assert found.table.num_rows == 30
    assert set(found.table.column("other_prefix").to_pylist()) == {FIRST}
    assert found.table.column("image_id").to_pylist() == found.table.column("other_image_id").to_pylist()


def test_an_index_without_the_partition_shows_as_missing_self_matches() -> None:
    rng = np.random.default_rng(4)
    first, second = _photos(rng, 30, "a"), _photos(rng, 20, "b")
    index = ExactIndex({FIRST: first})
    found = find_near_duplicates(*second, SECOND, MODEL, index.search)
    assert found.self_matches_missing == 20


def test_an_image_with_more_copies_than_neighbours_asked_is_flagged_as_possibly_truncated() -> None:
    rng = np.random.default_rng(5)
    ids, vectors = _photos(rng, 30, "b")
    for copy in range(1, 6):
        vectors[copy] = vectors[0] + rng.normal(scale=0.001, size=WIDTH)
    found = _run({SECOND: (ids, vectors)}, SECOND, neighbours_per_image=2)
    assert found.possibly_truncated == 6  # the six copies each see two copies and no further
    assert _run({SECOND: (ids, vectors)}, SECOND, neighbours_per_image=10).possibly_truncated == 0
    assert _run({SECOND: (ids, vectors)}, SECOND, neighbours_per_image=10).table.num_rows == 15  # 6 choose 2


def test_bad_inputs_are_refused() -> None:
    rng = np.random.default_rng(6)
    ids, vectors = _photos(rng, 5, "b")
    search = ExactIndex({SECOND: (ids, vectors)}).search
    with pytest.raises(ValueError, match="vectors"):
        find_near_duplicates(ids[:4], vectors, SECOND, MODEL, search)
    with pytest.raises(ValueError, match="threshold"):
        find_near_duplicates(ids, vectors, SECOND, MODEL, search, threshold=1.5)
    with pytest.raises(ValueError, match="unique"):
        find_near_duplicates(["same"] * 5, vectors, SECOND, MODEL, search)


RULE = ShareJumpRule(max_points_above_median=5.0, min_previous_partitions=3, min_images=50)


def test_the_jump_decision_fires_on_a_jump_and_not_on_steady_shares() -> None:
    steady = [0.02, 0.03, 0.025, 0.02, 0.035]
    assert not share_jumped(0.03, steady, RULE)
    assert not share_jumped(0.0, steady, RULE)  # a drop is no jump
    assert share_jumped(0.12, steady, RULE)
    # The median resists one odd earlier partition: a mean of these would be 0.22.
    assert share_jumped(0.10, [0.02, 0.03, 0.02, 0.03, 1.0], RULE)
    # Exactly at the margin is not above it; just over is.
    assert not share_jumped(0.07, [0.02, 0.02, 0.02], RULE)
    assert share_jumped(0.0701, [0.02, 0.02, 0.02], RULE)
    # Too few earlier partitions to judge.
    assert not share_jumped(0.9, [0.02, 0.02], RULE)


def _partition_with_copies(
    rng: np.random.Generator, tag: str, images: int, copied: int
) -> tuple[list[str], np.ndarray]:
    ids, vectors = _photos(rng, images, tag)
    for n in range(copied):  # image 2n+1 a copy of image 2n
        vectors[2 * n + 1] = vectors[2 * n] + rng.normal(scale=0.01, size=WIDTH)
    return ids, vectors


def test_the_check_fails_on_a_planted_jump_and_passes_on_steady_partitions() -> None:
    rng = np.random.default_rng(7)
    prefixes = [f"2026-11-0{day}" for day in range(1, 7)]
    copies = [1, 2, 1, 1, 2, 15]  # pairs per partition of 100 images: 2-4% steady, then 30%
    partitions = {p: _partition_with_copies(rng, f"d{p[-1]}", 100, c) for p, c in zip(prefixes, copies)}
    search = ExactIndex(partitions).search
    results = [find_near_duplicates(*partitions[p], p, MODEL, search) for p in prefixes]
    shares = [result.share_with_near_duplicate for result in results]
    assert shares == pytest.approx([c * 2 / 100 for c in copies])

    steady = near_duplicate_share_check(results[4], shares[:4], RULE)
    assert steady.passed, steady.description
    jumped = near_duplicate_share_check(results[5], shares[:5], RULE)
    assert not jumped.passed
    assert jumped.metadata["points_above_median"] == pytest.approx(28.0)  # 30% against the median 2%
    assert "more than the 5-point margin" in jumped.description
    early = near_duplicate_share_check(results[5], shares[:2], RULE)
    assert early.passed and "2 earlier partitions" in early.description


def test_the_check_passes_a_partition_too_small_to_judge() -> None:
    rng = np.random.default_rng(8)
    ids, vectors = _partition_with_copies(rng, "s", 10, 5)  # every image a near duplicate
    small = find_near_duplicates(ids, vectors, FIRST, MODEL, ExactIndex({FIRST: (ids, vectors)}).search)
    outcome = near_duplicate_share_check(small, [0.0, 0.0, 0.0], RULE)
    assert small.share_with_near_duplicate == 1.0
    assert outcome.passed and "too few" in outcome.description
