"""The `embedding_evaluation` asset: how well each model's vectors of a partition separate a sales label.

The article's quantitative evaluation (silhouette score, kNN label agreement, the
distribution of pairwise cosine similarities; `core/evaluation/scores.py`), one row per
partition and model in a Delta table, and the numbers plus a text histogram as
metadata, so materializations under two models sit side by side in the UI.
Scores of random weights are computed like any others and labelled meaningless.

For a CLIP model the row also holds zero-shot agreement: each image labelled by the
nearest of the text tower's prompts, one per value of the label column over the whole
sales table (`core/evaluation/zero_shot.py`). The tower is the `embedding_model`
resource's, used only for vectors of exactly its model_id, built at most once per step.
"""

# No `from __future__ import annotations` here: Dagster inspects the type of `context`.
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import dagster as dg

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
from imgemb_assets.dagster_wiring.location.partition_steps import AssetReport, StepEvent, materialize_prefixes
from imgemb_assets.dagster_wiring.location.partitions import per_prefix_asset, still_registered
from imgemb_assets.dagster_wiring.location.resources import StorageResource
from imgemb_assets.dagster_wiring.location.table_metadata import table_metadata
from imgemb_assets.dagster_wiring.search.resources import SimilaritySettings

if TYPE_CHECKING:
    from imgemb_assets.core.evaluation.zero_shot_agreement import ZeroShotSource


def build_evaluation_asset(policy: dg.BackfillPolicy, model_code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        **per_prefix_asset(policy),
        name=tables.EMBEDDING_EVALUATION,
        deps=[tables.IMAGE_EMBEDDINGS],
        code_version=model_code_version,
        kinds={"delta", "scikit-learn"},
        group_name="embeddings",
        description="Per partition and model: silhouette score and kNN agreement of the embeddings with a sales "
        "label column (the similarity resource's evaluation_label_column), and the distribution of pairwise "
        "cosine similarities; for a CLIP model, zero-shot agreement with that column (the nearest of the "
        "embedding_model's text-tower prompts, one per value). Meaningless for random weights, and labelled so.",
    )
    def embedding_evaluation(
        context: dg.AssetExecutionContext,
        storage: StorageResource,
        similarity: SimilaritySettings,
        embedding_model: EmbeddingModelResource,
    ) -> Iterator[StepEvent]:
        # scikit-learn (and, for a CLIP, torch) are imported by this step only, not by every process
        # that loads the location; the text tower is built on the first prefix whose vectors it pairs with.
        from imgemb_assets.core.evaluation.zero_shot import StepZeroShot

        lake = storage.lake()
        label = similarity.evaluation_label_column
        zero_shot = StepZeroShot(embedding_model.settings(), lake, label)
        yield from materialize_prefixes(
            context, lambda prefix: _evaluate_prefix(context, lake, prefix, label, zero_shot)
        )

    return embedding_evaluation


def _evaluate_prefix(
    context: dg.AssetExecutionContext, lake: Lake, prefix: str, label: str, zero_shot: "ZeroShotSource"
) -> Sequence[AssetReport]:
    from imgemb_assets.core.evaluation.scores import evaluate_partition

    embeddings = lake.read(tables.IMAGE_EMBEDDINGS, prefix)
    evaluation = evaluate_partition(embeddings, prefix, label, zero_shot=zero_shot)
    # Not for a prefix removed while it was evaluated: its row would outlive it.
    registered = still_registered(context.instance, prefix)
    lake.write_partition(tables.EMBEDDING_EVALUATION, evaluation.table, prefix, registered)
    if label not in embeddings.column_names:
        context.log.warning(f"{prefix}: no column {label!r} in the embedding table: only similarities are reported")
    metadata = table_metadata(lake, tables.EMBEDDING_EVALUATION, evaluation.table.num_rows, evaluation.table.schema)
    metadata["label_column"] = label
    # One model per partition is the rule; a partition holding two (mid re-embedding) shows each, prefixed.
    several = len(evaluation.by_model) > 1
    for model_id, result in evaluation.by_model.items():
        prefix_key = f"{model_id}/" if several else ""
        metadata[f"{prefix_key}model_id"] = model_id
        for key, value in result.metadata().items():
            metadata[prefix_key + key] = dg.MetadataValue.md(str(value)) if key == "summary" else value
        if model_id in evaluation.zero_shot_skipped:
            reason = evaluation.zero_shot_skipped[model_id]
            metadata[f"{prefix_key}zero_shot_not_scored"] = reason
            context.log.warning(f"{prefix}: {model_id}: zero-shot agreement not scored: {reason}")
    return [AssetReport(tables.EMBEDDING_EVALUATION, metadata)]
