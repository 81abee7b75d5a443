"""Near-duplicate images: pairs whose embeddings have a cosine similarity at or above a threshold.

One partition's vectors are searched against the whole index, so a pair is found
whether the other image is in the same partition or in another one. The index
must already hold this partition's vectors, or pairs inside it go unseen
(`NearDuplicates.self_matches_missing` counts the queries that did not find
themselves, which is how a missing partition shows).

Rows of one partition's result:
- each unordered pair once, never an image paired with itself;
- a pair across partitions has this partition's image in `image_id`/`prefix`,
  so a partition's rows can be replaced on their own. The same cross pair is
  therefore also a row of the other partition once that one is searched against
  an index holding this one: count cross pairs table-wide with that in mind;
- a pair inside the partition has the smaller image id in `image_id`.

The search itself is the caller's (`NeighbourSearch`): the wiring passes the
search index, the tests an exact numpy search.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import pyarrow as pa

from imgemb_assets.core.lake.tables import NEAR_DUPLICATES_SCHEMA, PARTITION_COLUMN
from imgemb_assets.core.quality.checks import CheckOutcome

# ResNet50 pooled features are non-negative (after a ReLU), so unrelated photos
# already sit at cosine 0.5-0.8; a re-encoded, resized or lightly cropped copy of
# one photo stays above ~0.95. 0.95 is the usual starting point for such
# features, not a value measured on this catalogue: tune it on labelled pairs.
DEFAULT_SIMILARITY_THRESHOLD: Final = 0.95
# Neighbours asked per image besides itself. An image with more near duplicates
# than this has some cut off; `NearDuplicates.possibly_truncated` counts them.
DEFAULT_NEIGHBOURS_PER_IMAGE: Final = 10
# Queries per search call: bounds the result lists held at once.
_QUERY_BATCH: Final = 1024


class Neighbour(Protocol):
    """One search hit, as the search index returns it (read-only attributes)."""

    @property
    def image_id(self) -> str: ...

    @property
    def prefix(self) -> str: ...

    @property
    def similarity(self) -> float: ...


class NeighbourSearch(Protocol):
    """`search(queries, k)`: the k most cosine-similar indexed images to each query row, best first."""

    def __call__(self, queries: np.ndarray, k: int) -> Sequence[Sequence[Neighbour]]: ...


@dataclass(frozen=True)
class NearDuplicates:
    table: pa.Table  # NEAR_DUPLICATES_SCHEMA
    images: int  # images of the partition that were searched
    images_with_near_duplicate: int
    # Images whose every returned neighbour passed the threshold: they may have more
    # near duplicates than were asked for, so their pairs can be incomplete.
    possibly_truncated: int
    # Queries whose own vector was not among their hits: the index lacks (part of)
    # this partition, or is approximate enough to miss an exact match.
    self_matches_missing: int

    @property
    def share_with_near_duplicate(self) -> float:
        return near_duplicate_share(self.images_with_near_duplicate, self.images)


@dataclass(frozen=True)
class ShareJumpRule:
    """When the share of images with a near duplicate counts as having jumped.

    Jumped: the partition's share is more than `max_points_above_median` percentage
    points above the median share of the earlier partitions given. A median, not a
    mean, so one earlier odd partition does not move the baseline.
    """

    # 5 points = one image in twenty newly a near duplicate: far more than a steady
    # catalogue drifts, about what a re-uploaded batch or a broken step turning many
    # images into the same picture (blank, placeholder) produces.
    max_points_above_median: float = 5.0
    # A median of fewer shares is mostly noise: the check passes and says why.
    min_previous_partitions: int = 3
    # In a partition of 20 images one image moves the share by 5 points.
    min_images: int = 50


def find_near_duplicates(
    image_ids: Sequence[str],
    vectors: np.ndarray,
    prefix: str,
    model_id: str,
    search: NeighbourSearch,
    threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    neighbours_per_image: int = DEFAULT_NEIGHBOURS_PER_IMAGE,
) -> NearDuplicates:
    """The partition's near-duplicate pairs: `vectors[i]` is image `image_ids[i]` of `prefix`."""
    _check_inputs(image_ids, vectors, threshold, neighbours_per_image)
    pairs: dict[tuple[tuple[str, str], tuple[str, str]], float] = {}
    possibly_truncated = self_matches_missing = 0
    # One more than asked, because each query finds itself first.
    k = neighbours_per_image + 1
    for start in range(0, len(image_ids), _QUERY_BATCH):
        batch_ids = image_ids[start : start + _QUERY_BATCH]
        hits_per_query = search(vectors[start : start + _QUERY_BATCH], k)
        if len(hits_per_query) != len(batch_ids):
            raise ValueError(f"search returned {len(hits_per_query)} hit lists for {len(batch_ids)} queries")
        for image_id, hits in zip(batch_ids, hits_per_query):
            query = (prefix, image_id)
            others = [hit for hit in hits if (hit.prefix, hit.image_id) != query]
            self_matches_missing += len(others) == len(hits)
            close = [hit for hit in others if hit.similarity >= threshold]
            possibly_truncated += len(hits) == k and len(close) == len(others)
            for hit in close:
                key = _pair_key(query, (hit.prefix, hit.image_id), prefix)
                # A pair inside the partition is found from both ends, with floats that
                # may differ in the last bits: keep the larger, whichever came first.
                pairs[key] = max(pairs.get(key, -1.0), float(hit.similarity))
    table = _pairs_table(pairs, prefix, model_id)
    return NearDuplicates(
        table=table,
        images=len(image_ids),
        images_with_near_duplicate=_images_in_pairs(pairs, prefix),
        possibly_truncated=possibly_truncated,
        self_matches_missing=self_matches_missing,
    )


def near_duplicate_share(images_with_near_duplicate: int, images: int) -> float:
    """The share of a partition's images with at least one near duplicate (0 for no images)."""
    return images_with_near_duplicate / images if images else 0.0


def near_duplicate_shares(pairs: pa.Table, images_per_partition: Mapping[str, int]) -> dict[str, float]:
    """Each partition's share of images with a near duplicate, from NEAR_DUPLICATES rows of one model.

    A pair inside a partition names both its images; a pair across partitions
    names this partition's image in `image_id`.
    """
    with_duplicate: dict[str, set[str]] = {}
    for row in pairs.select([PARTITION_COLUMN, "image_id", "other_image_id", "same_partition"]).to_pylist():
        images = with_duplicate.setdefault(row[PARTITION_COLUMN], set())
        images.add(row["image_id"])
        if row["same_partition"]:
            images.add(row["other_image_id"])
    return {
        prefix: len(with_duplicate.get(prefix, ())) / count for prefix, count in images_per_partition.items() if count
    }


def share_jumped(current_share: float, previous_shares: Sequence[float], rule: ShareJumpRule) -> bool:
    """Whether `current_share` is more than the rule's points above the median of `previous_shares`.

    False when there are fewer previous shares than the rule needs. Shares are
    fractions (0.07), the rule's margin is in percentage points (5.0).
    """
    if len(previous_shares) < rule.min_previous_partitions:
        return False
    return _points_above(current_share, previous_shares) > rule.max_points_above_median


def near_duplicate_share_check(
    result: NearDuplicates, previous_shares: Sequence[float], rule: ShareJumpRule
) -> CheckOutcome:
    """The asset check: fails when the partition's near-duplicate share jumped.

    `previous_shares` are the shares of the earlier partitions to compare with,
    chosen by the caller (e.g. the last 7 partitions before this one).
    """
    share = result.share_with_near_duplicate
    metadata: dict[str, float | int] = {
        "share_with_near_duplicate": round(share, 4),
        "images": result.images,
        "images_with_near_duplicate": result.images_with_near_duplicate,
        "pairs": result.table.num_rows,
        "previous_partitions": len(previous_shares),
        "max_points_above_median": rule.max_points_above_median,
    }
    stated = f"{share:.1%} of {result.images} images have a near duplicate"
    if result.images < rule.min_images:
        return CheckOutcome(True, f"{stated}; under {rule.min_images} images, too few to judge a jump", metadata)
    if len(previous_shares) < rule.min_previous_partitions:
        return CheckOutcome(
            True,
            f"{stated}; {len(previous_shares)} earlier partitions, under the "
            f"{rule.min_previous_partitions} needed to judge a jump",
            metadata,
        )
    median = statistics.median(previous_shares)
    points = _points_above(share, previous_shares)
    metadata |= {"median_previous_share": round(median, 4), "points_above_median": round(points, 2)}
    jumped = share_jumped(share, previous_shares, rule)
    verdict = "more than" if jumped else "within"
    return CheckOutcome(
        not jumped,
        f"{stated}: {points:+.1f} points against the median {median:.1%} of "
        f"{len(previous_shares)} earlier partitions ({verdict} the {rule.max_points_above_median:g}-point margin)",
        metadata,
    )


def _points_above(current_share: float, previous_shares: Sequence[float]) -> float:
    # Rounded so that a share exactly at the margin (0.07 against 0.02) is not
    # pushed over it by float error (5.000000000000001).
    return round(100.0 * (current_share - statistics.median(previous_shares)), 9)


def _check_inputs(image_ids: Sequence[str], vectors: np.ndarray, threshold: float, neighbours: int) -> None:
    if vectors.ndim != 2 or vectors.shape[0] != len(image_ids):
        raise ValueError(f"expected {len(image_ids)} vectors in an (N, width) array, got shape {vectors.shape}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"a cosine threshold lies in [-1, 1], got {threshold}")
    if neighbours < 1:
        raise ValueError(f"neighbours_per_image must be at least 1, got {neighbours}")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids of one partition must be unique")


def _pair_key(query: tuple[str, str], other: tuple[str, str], prefix: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(this partition's image, the other image); inside the partition, the smaller id first."""
    if other[0] == prefix and other < query:
        return other, query
    return query, other


def _images_in_pairs(pairs: dict[tuple[tuple[str, str], tuple[str, str]], float], prefix: str) -> int:
    images = {image for pair in pairs for image in pair if image[0] == prefix}
    return len(images)


def _pairs_table(pairs: dict[tuple[tuple[str, str], tuple[str, str]], float], prefix: str, model_id: str) -> pa.Table:
    ordered = sorted(pairs.items())
    return pa.Table.from_pydict(
        {
            "image_id": [mine[1] for (mine, _), _ in ordered],
            PARTITION_COLUMN: [prefix] * len(ordered),
            "other_image_id": [other[1] for (_, other), _ in ordered],
            "other_prefix": [other[0] for (_, other), _ in ordered],
            "similarity": [similarity for _, similarity in ordered],
            "same_partition": [other[0] == prefix for (_, other), _ in ordered],
            "model_id": [model_id] * len(ordered),
        },
        schema=NEAR_DUPLICATES_SCHEMA,
    )
