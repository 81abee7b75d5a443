"""The `similarity` resource: the near-duplicate threshold and share rule, and the evaluation's label column."""

import dagster as dg
from pydantic import Field

from imgemb_assets.core.search.near_duplicates import DEFAULT_SIMILARITY_THRESHOLD, ShareJumpRule


class SimilaritySettings(dg.ConfigurableResource):
    """What the search index, near-duplicate and evaluation assets use (`dagster_wiring/search/assets.py`, `dagster_wiring/evaluation/assets.py`)."""

    evaluation_label_column: str = Field(
        default="category",
        description="The sales column whose values the evaluation asks the embeddings to separate "
        "(silhouette, kNN label agreement, and for a CLIP zero-shot agreement with one prompt per value); "
        "without it only the similarity distribution is reported.",
    )
    near_duplicate_threshold: float = Field(
        default=DEFAULT_SIMILARITY_THRESHOLD,
        description="Two images whose embeddings have at least this cosine similarity are near duplicates.",
    )
    max_near_duplicate_share_jump_points: float = Field(
        default=ShareJumpRule.max_points_above_median,
        description="Warn when a partition's share of images with a near duplicate is more than this many "
        "percentage points above the median of the previous partitions'.",
    )

    def share_jump_rule(self) -> ShareJumpRule:
        return ShareJumpRule(max_points_above_median=self.max_near_duplicate_share_jump_points)
