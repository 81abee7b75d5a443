"""The `image_embeddings` asset: the only step in the `gpu` pool, carrying the GPU request in its tags.

The work on each prefix is `step.embed_prefix`; the model is built once per step, on the
first prefix that needs it.
"""

# No `from __future__ import annotations` here: Dagster inspects the type of
# `context` when the asset is defined.
from collections.abc import Iterator, Mapping

import dagster as dg

from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
from imgemb_assets.dagster_wiring.embedding.step import embed_prefix
from imgemb_assets.dagster_wiring.location.partition_steps import StepEvent, materialize_prefixes
from imgemb_assets.dagster_wiring.location.partitions import per_prefix_asset
from imgemb_assets.dagster_wiring.location.resources import QualityThresholds, StorageResource
from imgemb_assets.dagster_wiring.location.retries import permanent_failures
from imgemb_assets.dagster_wiring.names import EMBEDDING_DRIFT_CHECK, EMBEDDING_VALUES_CHECK, GPU_POOL


def build_embedding_asset(
    policy: dg.BackfillPolicy, gpu_tags: Mapping[str, str], code_version: str
) -> dg.AssetsDefinition:
    """The embedding asset: the only step in the `gpu` pool, carrying the GPU request in its tags."""

    @dg.asset(
        **per_prefix_asset(policy),
        name=tables.IMAGE_EMBEDDINGS,
        code_version=code_version,
        deps=[tables.IMAGES_WITH_SALES],
        kinds={"delta", "pytorch"},
        group_name="embeddings",
        pool=GPU_POOL,
        op_tags=dict(gpu_tags),
        check_specs=[
            dg.AssetCheckSpec(
                EMBEDDING_VALUES_CHECK,
                asset=tables.IMAGE_EMBEDDINGS,
                description="Every vector has the model's width and only finite values.",
            ),
            dg.AssetCheckSpec(
                EMBEDDING_DRIFT_CHECK,
                asset=tables.IMAGE_EMBEDDINGS,
                description="Mean shift, per-dimension variance shift and centroid cosine against the previous "
                "partition (the greatest prefix below this one); warns past the quality thresholds.",
            ),
        ],
        description="ResNet50 (classifier removed) embedding of every joined image, with its sales columns.",
    )
    def image_embeddings(
        context: dg.AssetExecutionContext,
        storage: StorageResource,
        embedding_model: EmbeddingModelResource,
        quality: QualityThresholds,
    ) -> Iterator[StepEvent]:
        # torch is imported here, by the one step that needs it, rather than by
        # every process that loads the code location (several seconds each).
        from imgemb_assets.core.embedding.partition import SharedModel

        with permanent_failures():
            # Built at most once per step, on the first prefix that needs it.
            model = SharedModel(embedding_model.settings())
        lake = storage.lake()
        yield from materialize_prefixes(context, lambda prefix: embed_prefix(context, lake, prefix, model, quality))

    return image_embeddings
